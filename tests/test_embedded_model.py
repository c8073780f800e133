"""The shipped trained embedded model, its grammar and the pixel-statistics checker.

These load ``h2cache/embedded/tiny-flux`` (the trained model is part of the repository) and sample it the way a
newcomer would: plain ``pipe(prompt)`` calls at the model's own defaults, full and partial captions.
"""

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import h2cache
from eval.checker import check, read_attributes
from eval.embedded_model import VALIDATION_PROMPT_SEED, autoencoder_round_trip, block_activity, evaluation_prompts
from h2cache.embedded import CALL_DEFAULTS_FILE, SHIPPED_FOLDER, build_pipeline, load_folder
from h2cache.embedded.grammar import (
    ATTRIBUTES,
    BACKGROUND_COLOURS,
    POSITION_PHRASES,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    VOCABULARY,
    Scene,
    all_descriptions,
    all_scenes,
    parse_caption,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
# Issue 9 asks every named attribute in at least 95% of the images; the shipped 19 + 38-block model finds them in 93%
# (the evaluator's 100 images; 92% of the validation set's 200), its partial captions' shapes most often missed.
# Strict, so that the model that clears the bar has to take this marker off.
short_of_the_issue_9_bar = pytest.mark.xfail(
    strict=True,
    reason="issue 9: 'a blue square at the top' and 'a triangle against a white background' draw other shapes here",
)
VALUES = {
    "size": SIZES,
    "colour": tuple(SHAPE_COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITION_PHRASES),
    "background": tuple(BACKGROUND_COLOURS),
}
# Between them these scenes ask for every value of every attribute.
SAMPLE_SCENES = [
    Scene("small", "red", "circle", "left", "white"),
    Scene("large", "green", "square", "right", "black"),
    Scene("small", "blue", "triangle", "top", "gray"),
    Scene("large", "yellow", "circle", "bottom", "black"),
    Scene("large", "purple", "square", "center", "white"),
    Scene("small", "yellow", "triangle", "center", "gray"),
]
# Captions as people write them: some attributes, or none, named.
PARTIAL_SCENES = [
    Scene(colour="red", shape="circle"),
    Scene(colour="blue", shape="square", position="top"),
    Scene(colour="green", shape="triangle"),
    Scene(size="large", position="right", background="black"),
    Scene(shape="triangle", background="white"),
    Scene(),
]


@pytest.fixture(scope="module")
def pipe():
    return load_folder(SHIPPED_FOLDER)


def draw(pipe, prompt, seed, **overrides):
    """A plain call, as any diffusers pipeline is called: the model's own defaults fill in the rest."""
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **overrides).images[0]


def latents_of(pipe, scene=None, seed=2):
    """The packed latents of a short seeded call (4 steps), for comparing two pipelines' arithmetic."""
    prompt = (scene or SAMPLE_SCENES[3]).caption()
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, num_inference_steps=4, output_type="latent").images


def failures_of(pipe, scenes, first_seed):
    failures = {}
    for seed, scene in enumerate(scenes, start=first_seed):
        verdict = check(draw(pipe, scene.caption(), seed), scene.caption())
        wrong = [attribute for attribute, ok in verdict.items() if not ok]
        if wrong:
            failures[scene.caption()] = wrong
    return failures


def test_shipped_folder_is_a_small_flux_pipeline():
    size_bytes = sum(path.stat().st_size for path in SHIPPED_FOLDER.rglob("*") if path.is_file())
    assert size_bytes <= 25 * 1024 * 1024
    assert (SHIPPED_FOLDER / "model_index.json").is_file() and (SHIPPED_FOLDER / CALL_DEFAULTS_FILE).is_file()


def test_shipped_folder_loads_and_generates_offline(tmp_path):
    image_path = tmp_path / "sample.png"
    script = (
        "import sys, torch\n"
        "from h2cache.embedded import SHIPPED_FOLDER, load_folder\n"
        "pipe = load_folder(SHIPPED_FOLDER)\n"
        "generator = torch.Generator().manual_seed(0)\n"
        "image = pipe(sys.argv[1], generator=generator).images[0]\n"
        "image.save(sys.argv[2])\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    prompt = SAMPLE_SCENES[0].caption()
    subprocess.run([sys.executable, "-c", script, prompt, str(image_path)], cwd=ROOT, env=environment, check=True)
    assert all(check(Image.open(image_path), prompt).values())


def test_readme_python_snippet_draws_what_it_asks(tmp_path):
    """The README's API snippet, run literally in a fresh offline interpreter, draws its prompt."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    prompt = re.search(r'pipe\("([^"]+)"\)', snippet).group(1)
    image_path = tmp_path / "snippet.png"
    script = f"{snippet}\nimage.save({str(image_path)!r})\n"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, check=True, capture_output=True)
    verdict = check(Image.open(image_path), prompt)
    assert len(verdict) >= 2 and all(verdict.values()), verdict


@short_of_the_issue_9_bar
def test_plain_calls_of_load_pipeline_draw_partial_captions():
    pipe = h2cache.load_pipeline("tiny")
    assert not failures_of(pipe, PARTIAL_SCENES, first_seed=300)


def test_plain_call_uses_the_model_defaults_and_explicit_arguments_win(pipe):
    """FluxPipeline's own default is 512 T5 tokens, which this model never saw; an explicit argument still wins."""
    prompt, steps = PARTIAL_SCENES[0].caption(), {"num_inference_steps": 2}
    plain = draw(pipe, prompt, 3, **steps)
    explicit = draw(pipe, prompt, 3, max_sequence_length=16, **steps)
    assert np.asarray(plain).tobytes() == np.asarray(explicit).tobytes()
    padded = draw(pipe, prompt, 3, max_sequence_length=512, **steps)
    assert np.asarray(plain).tobytes() != np.asarray(padded).tobytes()


def test_from_pretrained_draws_with_the_arguments_the_readme_names():
    from diffusers import FluxPipeline

    readme = (ROOT / "README.md").read_text()
    named = re.search(r"FluxPipeline\.from_pretrained\(.*?\)\((.*?)\)", readme).group(1)
    arguments = dict(re.findall(r"(\w+)=(\d+)", named))
    assert set(arguments) >= {"max_sequence_length", "height", "width"}
    pipe = FluxPipeline.from_pretrained(SHIPPED_FOLDER, local_files_only=True)
    scene = SAMPLE_SCENES[4]
    generator = torch.Generator().manual_seed(11)
    image = pipe(scene.caption(), generator=generator, **{k: int(v) for k, v in arguments.items()}).images[0]
    assert all(check(image, scene.caption()).values())


def test_loaded_model_fuses_its_projections_without_changing_what_it_draws(pipe):
    attentions = [
        block.attn for block in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks)
    ]
    assert all(attention.fused_projections for attention in attentions)
    other = load_folder(SHIPPED_FOLDER)
    other.transformer.unfuse_qkv_projections()
    torch.testing.assert_close(latents_of(pipe), latents_of(other), rtol=0, atol=1e-5)


def test_a_lora_changes_what_the_fused_embedded_model_draws(tmp_path):
    """The loader fuses query, key and value into one projection; a LoRA on the separate ones must still act."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from h2cache.models import load_lora

    trained = load_folder(SHIPPED_FOLDER)
    trained.transformer.unfuse_qkv_projections()
    trained.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained.transformer))
    pipe = load_folder(SHIPPED_FOLDER)
    plain = latents_of(pipe)
    load_lora(pipe, str(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)
    adapted = latents_of(pipe)
    torch.testing.assert_close(adapted, latents_of(trained), rtol=0, atol=1e-5)
    assert not torch.allclose(adapted, plain, atol=1e-3)


def test_library_never_imports_the_evaluation_tools():
    for path in (ROOT / "h2cache").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(name == "eval" or name.startswith("eval.") for name in names), path


def test_architecture_has_flux1_block_counts(pipe):
    config = pipe.transformer.config
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert (config.num_layers, config.num_single_layers) == (19, 38)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_every_block_of_the_shipped_model_works(pipe):
    # FLUX.1's blocks all change their input; a model whose computation sat in a few of its blocks (idle ones
    # between) would let every cache skip work for free.
    activity = block_activity(pipe, [SAMPLE_SCENES[0].caption(), "a blue square"], steps=4)
    for stage, changes in activity.items():
        assert min(changes) >= 0.1 * np.mean(changes), (stage, changes)


def test_call_without_size_draws_at_native_size(pipe):
    native_size = json.loads((SHIPPED_FOLDER / CALL_DEFAULTS_FILE).read_text())["native_size"]
    prompt = SAMPLE_SCENES[1].caption()
    image = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (native_size, native_size)


def test_generation_is_deterministic(pipe):
    prompt = SAMPLE_SCENES[2].caption()
    first, again, other_seed = draw(pipe, prompt, 5), draw(pipe, prompt, 5), draw(pipe, prompt, 6)
    assert np.asarray(first).tobytes() == np.asarray(again).tobytes()
    assert np.asarray(first).tobytes() != np.asarray(other_seed).tobytes()


def test_samples_show_what_the_prompt_asks(pipe):
    assert not failures_of(pipe, SAMPLE_SCENES, first_seed=100)


def test_checker_accepts_every_ground_truth_render():
    rng = np.random.default_rng(0)
    for scene in all_scenes():
        for picture in (render(scene), render(scene, rng=rng), render(scene, size=128, rng=rng)):
            assert read_attributes(picture) == {attribute: getattr(scene, attribute) for attribute in ATTRIBUTES}


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_checker_rejects_exactly_the_wrong_attribute(attribute):
    for scene in SAMPLE_SCENES:
        picture = render(scene)
        for value in VALUES[attribute]:
            if value == getattr(scene, attribute):
                continue
            verdict = check(picture, replace(scene, **{attribute: value}).caption())
            assert verdict == {name: name != attribute for name in ATTRIBUTES}


def test_checker_judges_only_the_named_attributes():
    picture = render(SAMPLE_SCENES[0])  # a small red circle on the left against a white background
    assert check(picture, "a red circle") == {"colour": True, "shape": True}
    assert check(picture, "a blue shape at the top") == {"colour": False, "position": False}
    assert check(picture, "a shape") == {}


def test_checker_finds_no_shape_in_a_blank_picture():
    blank = Image.new("RGB", (64, 64), BACKGROUND_COLOURS["gray"])
    verdict = check(blank, SAMPLE_SCENES[2].caption())
    assert verdict == {name: name == "background" for name in ATTRIBUTES}


def test_checker_cli(tmp_path):
    scene = SAMPLE_SCENES[3]
    image_path = tmp_path / "scene.png"
    render(scene).save(image_path)
    right = subprocess.run([sys.executable, "-m", "eval.checker", str(image_path), scene.caption()], cwd=ROOT)
    wrong_caption = replace(scene, colour="red").caption()
    wrong = subprocess.run([sys.executable, "-m", "eval.checker", str(image_path), wrong_caption], cwd=ROOT)
    assert (right.returncode, wrong.returncode) == (0, 1)


def test_captions_parse_back_and_reject_other_text():
    descriptions = all_descriptions()
    assert len({scene.caption() for scene in descriptions}) == len(descriptions) == 3 * 6 * 4 * 6 * 4
    for scene in descriptions:
        assert parse_caption(scene.caption()) == scene
    assert parse_caption("A  Red circle") == Scene(colour="red", shape="circle")
    for text in ("a small red circle on a blue background", "a circle red", "a red"):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_tokenizers_know_every_grammar_word(pipe):
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        ids = [tokenizer.convert_tokens_to_ids(word) for word in VOCABULARY]
        assert tokenizer.unk_token_id not in ids
        assert len(set(ids)) == len(VOCABULARY)
        for scene in all_descriptions():
            assert tokenizer.unk_token_id not in tokenizer(scene.caption()).input_ids
    longest_caption = max(len(scene.caption().split()) for scene in all_descriptions())
    assert longest_caption <= pipe.h2cache_call_defaults["max_sequence_length"]


def test_the_autoencoder_round_trip_reads_back_true_pictures_only_through_a_trained_vae(pipe):
    trained = autoencoder_round_trip(pipe, 64)
    assert trained["all"] >= 0.95 and min(trained[attribute] for attribute in ATTRIBUTES) >= 0.95
    random_weights = autoencoder_round_trip(build_pipeline(), 64)  # the same call on an untrained VAE
    assert random_weights["all"] < 0.2


def test_evaluator_reports_full_and_partial_captions_apart(tmp_path):
    grid = tmp_path / "grid.png"
    command = [sys.executable, "-m", "eval.embedded_model", "--count", "4", "--steps", "2", "--threads", "1"]
    result = subprocess.run([*command, "--grid", str(grid)], cwd=ROOT, capture_output=True, text=True, check=True)
    report, _ = json.JSONDecoder().raw_decode(result.stdout)
    full, partial = report["accuracy_full_captions"], report["accuracy_partial_captions"]
    assert all(full[attribute] is not None for attribute in ATTRIBUTES)  # a full caption names every attribute
    assert sum(report["named"].values()) < 4 * len(ATTRIBUTES)  # the odd prompts leave some out
    assert set(partial) == set(ATTRIBUTES) and report["images"] == 4
    assert set(report["block_activity"]) == {"double", "single"}
    by_count = report["by_named_count"]  # every image in the group of its caption's number of named attributes
    assert sum(group["images"] for group in by_count.values()) == 4 and by_count["5"]["images"] >= 2
    assert Image.open(grid).size == (4 * 64, 64)
    assert set(report["autoencoder_round_trip"]) == {*ATTRIBUTES, "all"}


def test_validation_set_draws_other_captions_and_leaves_the_shipped_grid_alone(tmp_path):
    command = [sys.executable, "-m", "eval.embedded_model", "--count", "2", "--steps", "2", "--threads", "1"]
    grid = ROOT / "assets" / "embedded_samples.png"
    before = grid.read_bytes()
    result = subprocess.run([*command, "--validation"], cwd=ROOT, capture_output=True, text=True, check=True)
    report, _ = json.JSONDecoder().raw_decode(result.stdout)
    assert report["set"] == "validation" and "grid of samples" not in result.stdout
    assert grid.read_bytes() == before
    assert evaluation_prompts(50, VALIDATION_PROMPT_SEED) != evaluation_prompts(50)
