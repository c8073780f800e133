"""Metric tests with real maths on real on-disk formats, fully offline (metrics.md §8).

Weights are random but written in the real formats (TorchScript CLIP archive, CLIP state dict, torchvision AlexNet
checkpoint) and loaded through the production loaders; the reference implementations (scikit-image, piq) are
independent oracles.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import weights
from eval.metrics import MetricSuite
from eval.metrics.clip_iqa import ClipIqa, load_clip_model, prompt_tokens
from eval.metrics.fidelity import Lpips, psnr, psnr_per_image, ssim, ssim_per_image
from eval.metrics.images import to_unit_tensor
from eval.weights import (
    ALEXNET_CHECKPOINT,
    EXIT_MISSING_WEIGHTS,
    MissingWeightsError,
    WeightFile,
    check_weights,
    format_missing,
    sha256_of_file,
)
from h2cache.embedded.grammar import Scene, render

CLIP_RELATIVE = "clip/RN50.pt"
ALEXNET_RELATIVE = f"torch/hub/checkpoints/{ALEXNET_CHECKPOINT}"


pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny RN50-style CLIP from config, saved as a TorchScript archive (like OpenAI's) and as a state dict."""
    from piq.feature_extractors.clip import CLIP

    torch.manual_seed(0)
    model = CLIP(
        embed_dim=16, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
    ).eval()  # fmt: skip
    # The zero-initialised bn3 of piq's init makes every residual branch vanish; random values keep them alive.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bn3.weight"):
                parameter.normal_(1.0, 0.2)
    folder = tmp_path_factory.mktemp("tiny_clip")
    torchscript_path, state_dict_path = folder / "RN50.pt", folder / "RN50_state_dict.pt"
    # torch.jit.script fails on piq's nested def; tracing a method keeps the whole module and its parameter names.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's deprecation and constant-folding notices, irrelevant to weights
        torch.jit.trace_module(model, {"encode_text": (prompt_tokens(),)}).save(str(torchscript_path))
    torch.save(model.state_dict(), state_dict_path)
    return {"torchscript": torchscript_path, "state_dict": state_dict_path}


@pytest.fixture(scope="session")
def alexnet_checkpoint(tmp_path_factory):
    """A seeded random torchvision AlexNet state dict in the file torchvision would download; and its sha256."""
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alexnet") / ALEXNET_CHECKPOINT
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path, sha256_of_file(path)


def plant(source: Path, destination: Path) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.symlink_to(source)
    return destination


def textured_pair(size=(96, 128), amplitude=40, seed=0):
    """A smooth image and a copy perturbed by up to ±amplitude grey levels (≥16 exposes uint8 wrap-around)."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height) + 64)], axis=2)
    noisy = base + rng.integers(-amplitude, amplitude + 1, size=base.shape)
    return base.astype(np.uint8), np.clip(noisy, 0, 255).astype(np.uint8)


# PSNR / SSIM -------------------------------------------------------------------------------------------------------


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    image, _ = textured_pair()
    assert psnr(image, image.copy()) == math.inf
    assert ssim(image, image.copy()) == pytest.approx(1.0, abs=1e-6)


def test_identical_pictures_with_flat_backgrounds_give_ssim_exactly_1():
    """torchmetrics in float32 scores such a pair 0.999: its variances there are rounding noise."""
    picture = np.asarray(render(Scene("small", "yellow", "circle", "right", "white"), size=64, rng=None))
    assert ssim(picture, picture.copy()) == 1.0


def test_ssim_is_torchmetrics_ssim_computed_in_float64():
    from torchmetrics.functional.image import structural_similarity_index_measure

    pairs = [textured_pair(size=(48, 80), amplitude=30, seed=3)]
    picture = np.asarray(render(Scene("large", "purple", "square", "top", "gray"), size=64, rng=None))
    pairs.append(
        (picture, np.clip(picture.astype(int) + np.random.default_rng(0).integers(-9, 10, picture.shape), 0, 255))
    )
    for reference, image in pairs:
        expected = structural_similarity_index_measure(
            to_unit_tensor(np.asarray(image, dtype=np.uint8), torch.float64),
            to_unit_tensor(np.asarray(reference, dtype=np.uint8), torch.float64),
            gaussian_kernel=True,
            sigma=1.5,
            kernel_size=11,
            data_range=1.0,
        )
        assert ssim(np.asarray(image, dtype=np.uint8), reference) == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize("offset", [16, 40])
def test_psnr_of_a_uniform_offset_matches_the_analytic_value(offset):
    reference = np.full((32, 48, 3), 10, dtype=np.uint8)
    image = reference + np.uint8(offset)
    # MSE = (offset/255)², so PSNR = 20·log10(255/offset); uint8 subtraction 10 - (10+offset) would wrap to 256-offset.
    expected = 20 * math.log10(255 / offset)
    assert psnr(image, reference) == pytest.approx(expected, abs=1e-9)
    assert psnr(reference, image) == pytest.approx(expected, abs=1e-9)


def test_psnr_and_ssim_agree_with_scikit_image_at_1024():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    reference, image = textured_pair(size=(1024, 1024), amplitude=40)
    expected_psnr = peak_signal_noise_ratio(reference, image, data_range=255)
    expected_ssim = structural_similarity(
        reference, image, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert psnr(image, reference) == pytest.approx(expected_psnr, abs=1e-5)
    assert abs(ssim(image, reference) - expected_ssim) <= 2e-3


def test_psnr_and_ssim_are_per_image_not_pooled_over_the_batch():
    reference_a, image_a = textured_pair(amplitude=4, seed=1)
    reference_b, image_b = textured_pair(amplitude=60, seed=2)
    images = torch.cat([to_unit_tensor(image_a, torch.float64), to_unit_tensor(image_b, torch.float64)])
    references = torch.cat([to_unit_tensor(reference_a, torch.float64), to_unit_tensor(reference_b, torch.float64)])

    per_image = psnr_per_image(images, references)
    assert per_image.tolist() == pytest.approx([psnr(image_a, reference_a), psnr(image_b, reference_b)], abs=1e-9)
    pooled = 10 * math.log10(1 / ((images - references) ** 2).mean().item())
    assert abs(per_image.mean().item() - pooled) > 1.0  # the two conventions differ a lot on unequal pairs

    ssims = ssim_per_image(images, references)
    assert ssims.tolist() == pytest.approx([ssim(image_a, reference_a), ssim(image_b, reference_b)], abs=1e-6)
    assert ssims[0] > ssims[1]


def test_pil_images_arrays_and_paths_give_the_same_scores(tmp_path):
    reference, image = textured_pair()
    Image.fromarray(reference).save(tmp_path / "reference.png")
    Image.fromarray(image).save(tmp_path / "image.png")
    from_arrays = (psnr(image, reference), ssim(image, reference))
    from_pil = (psnr(Image.fromarray(image), Image.fromarray(reference)), ssim(Image.fromarray(image), reference))
    from_paths = (
        psnr(tmp_path / "image.png", tmp_path / "reference.png"),
        ssim(str(tmp_path / "image.png"), reference),
    )
    assert from_arrays == from_pil == from_paths


def test_bad_inputs_are_refused_with_the_fix_named():
    reference, image = textured_pair()
    with pytest.raises(ValueError, match="quantise to uint8"):
        psnr(image.astype(np.float32) / 255, reference)
    with pytest.raises(ValueError, match="same prompt, seed and size"):
        ssim(image[:, :-1], reference)


# CLIP-IQA -----------------------------------------------------------------------------------------------------------


def random_images(count, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), generator=generator, dtype=torch.uint8).float() / 255


def test_clip_iqa_loads_torchscript_and_state_dict_to_the_same_model(tiny_clip):
    images = random_images(3, 64, 96)
    from_torchscript = ClipIqa(tiny_clip["torchscript"]).score_batch(images)
    from_state_dict = ClipIqa(tiny_clip["state_dict"]).score_batch(images)
    assert torch.equal(from_torchscript, from_state_dict)


def test_clip_iqa_scores_lie_in_the_open_unit_interval_and_ignore_batch_order(tiny_clip):
    scorer = ClipIqa(tiny_clip["torchscript"])
    images = random_images(4, 96, 160)  # non-square, not the model's 64² "native" size
    scores = scorer.score_batch(images)
    assert scores.shape == (4,)
    assert ((scores > 0) & (scores < 1)).all()
    assert scores.std() > 0  # distinguishes images; a constant would pass the range check trivially
    order = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(scorer.score_batch(images[order]), scores[order], atol=1e-6)


def test_clip_iqa_runs_at_native_1024_resolution_on_a_saved_png(tiny_clip, tmp_path):
    pixels = (random_images(1, 1024, 1024, seed=3)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "image.png")
    scorer = ClipIqa(tiny_clip["torchscript"])
    score = scorer(tmp_path / "image.png")
    assert 0 < score < 1
    assert score == scorer.score_batch(to_unit_tensor(pixels)).item()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_clip_iqa_equals_piq_exactly_on_the_same_weights(tiny_clip):
    import piq

    # piq reads ~/.cache/clip/RN50.pt and clipiqa_tokens.pt (HOME is tmp_path here); its tokens file holds the same
    # 2×77 ids for "Good photo."/"Bad photo." that prompt_tokens() builds.
    cache = Path(os.path.expanduser("~/.cache/clip"))
    plant(tiny_clip["torchscript"], cache / "RN50.pt")
    torch.save(prompt_tokens(), cache / "clipiqa_tokens.pt")
    images = torch.cat([random_images(2, 64, 64, seed=5), random_images(2, 64, 64, seed=6)])
    ours = ClipIqa(tiny_clip["torchscript"]).score_batch(images)
    theirs = piq.CLIPIQA(data_range=1.0)(images)  # N×1
    assert torch.equal(ours, theirs[:, 0])


def test_clip_loader_names_the_problem_for_absent_or_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preflight"):
        load_clip_model(tmp_path / "absent.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an OpenAI CLIP ResNet checkpoint"):
        load_clip_model(tmp_path / "foreign.pt")


# LPIPS --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def lpips_metric(alexnet_checkpoint):
    plant(alexnet_checkpoint[0], Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints" / ALEXNET_CHECKPOINT)
    return Lpips()


def test_lpips_is_zero_for_identical_images_symmetric_and_positive_otherwise(lpips_metric):
    reference, image = textured_pair(size=(64, 96), amplitude=40)
    assert lpips_metric(reference, reference.copy()) == 0.0
    forward, backward = lpips_metric(image, reference), lpips_metric(reference, image)
    assert forward > 0
    assert forward == pytest.approx(backward, rel=1e-6)
    _, stronger = textured_pair(size=(64, 96), amplitude=120)
    assert lpips_metric(stronger, reference) > forward


def test_lpips_equals_the_lpips_package_when_installed(lpips_metric):
    lpips = pytest.importorskip("lpips")
    reference, image = textured_pair(size=(64, 96))
    theirs = lpips.LPIPS(net="alex", verbose=False)(
        to_unit_tensor(image) * 2 - 1, to_unit_tensor(reference) * 2 - 1
    ).item()
    assert lpips_metric(image, reference) == pytest.approx(theirs, abs=1e-6)


def test_lpips_without_its_backbone_raises_the_preflight_table_instead_of_downloading():
    with pytest.raises(MissingWeightsError) as raised:
        Lpips()
    assert ALEXNET_CHECKPOINT in str(raised.value)
    assert raised.value.exit_code == EXIT_MISSING_WEIGHTS == 3


# Preflight and MetricSuite ------------------------------------------------------------------------------------------


def test_preflight_lists_every_missing_file_in_one_table(tmp_path):
    missing = check_weights(tmp_path / "weights")
    assert {(item.metric, item.relative_path) for item in missing} == {
        ("clip_iqa", CLIP_RELATIVE),
        ("lpips", ALEXNET_RELATIVE),
    }
    table = format_missing(missing)
    for item in missing:
        assert item.expected_path in table and item.source_url in table and item.sha256 in table
    assert table.count("Missing metric weights") == 1
    assert check_weights(tmp_path / "weights", metrics=("psnr", "ssim")) == []


def test_preflight_rejects_a_file_with_the_wrong_checksum(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / CLIP_RELATIVE).write_bytes(b"not the OpenAI RN50 archive")
    (missing,) = check_weights(tmp_path, metrics=("clip_iqa",))
    assert missing.problem.startswith("sha256 mismatch")


def test_preflight_cli_prints_the_table_and_exits_with_the_dedicated_code(tmp_path, capsys):
    assert weights.main(["--weights-dir", str(tmp_path), "--metrics", "lpips"]) == EXIT_MISSING_WEIGHTS
    output = capsys.readouterr().out
    assert str(tmp_path / ALEXNET_RELATIVE) in output and str(tmp_path / CLIP_RELATIVE) not in output
    assert weights.main(["--weights-dir", str(tmp_path), "--metrics", "psnr", "ssim"]) == 0


def test_weights_dir_falls_back_to_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
    (missing,) = check_weights(None, metrics=("clip_iqa",))
    assert missing.expected_path == str(tmp_path / CLIP_RELATIVE)
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV)
    (missing,) = check_weights(None, metrics=("clip_iqa",))
    assert missing.problem == "no weights dir given"


@pytest.fixture
def weights_dir(tmp_path, tiny_clip, alexnet_checkpoint, monkeypatch):
    """A weights dir in the documented layout holding the tiny test weights, with their checksums as expected."""
    root = tmp_path / "weights"
    plant(tiny_clip["torchscript"], root / CLIP_RELATIVE)
    plant(alexnet_checkpoint[0], root / ALEXNET_RELATIVE)
    expected = {
        "clip_iqa": (WeightFile("clip_iqa", CLIP_RELATIVE, "test", sha256_of_file(tiny_clip["torchscript"])),),
        "lpips": (WeightFile("lpips", ALEXNET_RELATIVE, "test", alexnet_checkpoint[1]),),
    }
    monkeypatch.setitem(weights.WEIGHT_FILES, "clip_iqa", expected["clip_iqa"])
    monkeypatch.setitem(weights.WEIGHT_FILES, "lpips", expected["lpips"])
    return root


def save_pair(tmp_path):
    reference, image = textured_pair(size=(64, 96))
    Image.fromarray(reference).save(tmp_path / "reference.png")
    Image.fromarray(image).save(tmp_path / "image.png")
    return tmp_path / "image.png", tmp_path / "reference.png"


def test_suite_scores_every_metric_from_the_weights_dir_only(weights_dir, tmp_path):
    image_path, reference_path = save_pair(tmp_path)
    suite = MetricSuite(weights_dir)
    assert os.environ["TORCH_HOME"] == str(weights_dir / "torch")
    assert suite.preflight() == []

    scores = suite.score(image_path, reference_path)
    assert set(scores) == {"clip_iqa", "psnr", "ssim", "lpips"}
    assert scores["psnr"] == psnr(image_path, reference_path)
    assert scores["ssim"] == ssim(image_path, reference_path)
    assert scores["lpips"] == Lpips()(image_path, reference_path)
    assert scores["clip_iqa"] == ClipIqa(weights_dir / CLIP_RELATIVE)(image_path)

    baseline = suite.score(reference_path, None)
    assert baseline["psnr"] is None and baseline["ssim"] is None and baseline["lpips"] is None
    assert 0 < baseline["clip_iqa"] < 1


def test_suite_stops_at_preflight_unless_told_to_skip_missing(weights_dir, tmp_path):
    (weights_dir / ALEXNET_RELATIVE).unlink()
    with pytest.raises(MissingWeightsError) as raised:
        MetricSuite(weights_dir).preflight()
    assert str(weights_dir / ALEXNET_RELATIVE) in str(raised.value)

    image_path, reference_path = save_pair(tmp_path)
    suite = MetricSuite(weights_dir, skip_missing=True)
    assert [item.metric for item in suite.preflight()] == ["lpips"]
    scores = suite.score(image_path, reference_path)
    assert scores["lpips"] == f"n/a (weights missing: {ALEXNET_RELATIVE})"
    assert isinstance(scores["clip_iqa"], float) and isinstance(scores["psnr"], float)


def test_suite_without_weights_dir_runs_psnr_and_ssim(tmp_path):
    image_path, reference_path = save_pair(tmp_path)
    suite = MetricSuite(metrics=("psnr", "ssim"))
    assert suite.preflight() == []
    assert suite.score(image_path, reference_path) == {
        "psnr": psnr(image_path, reference_path),
        "ssim": ssim(image_path, reference_path),
    }
    with pytest.raises(MissingWeightsError, match="no weights dir given"):
        MetricSuite().preflight()
    with pytest.raises(ValueError, match="choose from"):
        MetricSuite(metrics=("psnr", "fid"))
