"""The training script's promises, on a shrunken copy of its recipe: a resumed run computes what an unbroken one
would, the exported folder loads as a pipeline, and the decoder phase leaves the encoder (the flow model's latent
space) untouched."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

import h2cache.embedded.train as train
from h2cache.embedded import CALL_DEFAULTS_FILE, load_folder
from h2cache.embedded.builder import build_components
from h2cache.embedded.grammar import BACKGROUND_COLOURS, all_scenes, render


@pytest.fixture
def small_recipe(monkeypatch):
    monkeypatch.setattr(train, "EMBEDDED_SPEC", replace(train.EMBEDDED_SPEC, num_double=2, num_single=3))
    for name, value in {
        "VAE_STEPS": 2,
        "VAE_BATCH": 2,
        "LATENT_STATS_IMAGES": 4,
        "DECODER_STEPS": 2,
        "LATENT_POOL": 5,
        "SHALLOW_BLOCKS": (1, 2),
        "SHALLOW_STEPS": 3,
        "SHALLOW_BATCH": 2,
        "FULL_CAPTION_STEPS": 1,
        "DISTIL_STEPS": 3,
        "DISTIL_BATCH": 2,
        "WARMUP_STEPS": 1,
        "CHECKPOINT_EVERY": 1,
    }.items():
        monkeypatch.setattr(train, name, value)


class Killed(Exception):
    pass


def train_in_process(out, monkeypatch, kill_after=()):
    """Phases 1, 2 and 3 in this process, rerun after each simulated kill: ``kill_after`` names the checkpoints
    (file name, step) right after whose writing the run dies, as a killed command would."""
    real_save = train._save

    def save_then_maybe_die(path, state):
        real_save(path, state)
        if (path.name, state.get("step")) in kill_after:
            raise Killed(path.name)

    monkeypatch.setattr(train, "_save", save_then_maybe_die)
    for _ in range(len(kill_after) + 1):
        try:
            trainer = train.Trainer(out, seed=3)
            record = {"autoencoder": {"steps": train.VAE_STEPS, "seconds": trainer.train_autoencoder()}}
            ema, flow_record = trainer.train_flow(record)
            break
        except Killed:
            continue
    encoder_before = {k: v.clone() for k, v in trainer.vae.encoder.state_dict().items()}
    trainer.refine_decoder()
    assert all(torch.equal(v, encoder_before[k]) for k, v in trainer.vae.encoder.state_dict().items())
    trainer.export(ema, {**record, "rectified_flow": flow_record})
    return torch.load(out / "flow.pt", weights_only=True)


def test_resumed_training_equals_an_unbroken_run_and_exports_a_pipeline(small_recipe, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    unbroken = train_in_process(tmp_path / "unbroken", monkeypatch)
    kills = {("autoencoder.pt", 1), ("flow-shallow.pt", 1), ("flow.pt", 2)}
    resumed = train_in_process(tmp_path / "resumed", monkeypatch, kill_after=kills)
    assert unbroken["step"] == resumed["step"] == 3
    for key, value in unbroken["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    pipe = load_folder(tmp_path / "resumed" / "tiny-flux")
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (2, 3)
    assert pipe.h2cache_call_defaults["max_sequence_length"] == train.EMBEDDED_SPEC.max_sequence_length
    written = json.loads((tmp_path / "resumed" / "tiny-flux" / CALL_DEFAULTS_FILE).read_text())
    assert {k: written["training"]["rectified_flow"][k] for k in ("shallow_steps", "steps")} == {
        "shallow_steps": 3,
        "steps": 3,
    }
    # where the weights were made: another CPU's kernels round differently and train other weights
    machine = written["training"]["machine"]
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["torch"] == torch.__version__ and machine["cpu"]
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)
    # Stored in float16 (the 25 MB budget), loaded as float32, by load_folder and by a plain from_pretrained alike.
    stored = load_file(tmp_path / "resumed" / "tiny-flux" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    plain = FluxPipeline.from_pretrained(tmp_path / "resumed" / "tiny-flux", local_files_only=True)
    assert pipe.transformer.dtype == plain.transformer.dtype == torch.float32


def test_the_full_size_transformer_fits_the_folder_budget():
    transformer = build_components(train.EMBEDDED_SPEC, seed=0)["transformer"]
    float16_bytes = 2 * sum(p.numel() for p in transformer.parameters())
    # The folder may take 25 MiB (test_embedded_model); VAE, text encoders and tokenizers take about 1.5 MB of it.
    assert float16_bytes <= 23.5 * 1024 * 1024


def flow_inputs(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(2, 16, config.in_channels, generator=generator),
        timestep=torch.tensor([0.3, 0.8]),
        guidance=torch.tensor([3.5, 3.5]),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
        encoder_hidden_states=torch.randn(2, 8, config.joint_attention_dim, generator=generator),
        txt_ids=torch.zeros(8, 3),
        img_ids=torch.rand(16, 3, generator=generator) * 4,
        return_dict=False,
    )


def test_growth_spreads_each_shallow_block_over_a_run_that_shares_its_update():
    template = build_components(replace(train.EMBEDDED_SPEC, num_double=1, num_single=1), seed=0)["transformer"]
    shallow = train._with_depth(template, 2, 4, seed=1)  # default initialisation: every block changes its input
    deep = train._grow(shallow, train._with_depth(template, 5, 9, seed=2))
    for shallow_blocks, deep_blocks, modulation, gates in (
        (shallow.transformer_blocks, deep.transformer_blocks, "norm1", (2, 5)),
        (shallow.single_transformer_blocks, deep.single_transformer_blocks, "norm", (2,)),
    ):
        runs = [j * len(deep_blocks) // len(shallow_blocks) for j in range(len(shallow_blocks))] + [len(deep_blocks)]
        assert runs[:-1] == sorted(set(runs[:-1])) and runs[0] == 0  # each stage opens with a copy (a probe)
        for j, block in enumerate(shallow_blocks):
            length = runs[j + 1] - runs[j]
            for copy in deep_blocks[runs[j] : runs[j + 1]]:
                assert torch.equal(copy.attn.to_q.weight, block.attn.to_q.weight)
                source, scaled = getattr(block, modulation).linear.weight, getattr(copy, modulation).linear.weight
                chunks = len(source) // source.shape[1]  # shift, scale, gate (x2 in a double-stream block)
                for index, (original, share) in enumerate(zip(source.chunk(chunks), scaled.chunk(chunks), strict=True)):
                    expected = original / length if index in gates else original
                    torch.testing.assert_close(share, expected, rtol=0, atol=1e-7)
    # Not exact, but close: the run adds the block's update in shares (Euler steps).
    inputs = flow_inputs(shallow)
    reference, output = shallow(**inputs)[0], deep(**inputs)[0]
    assert (output - reference).norm() < 0.5 * reference.norm()


def test_distillation_target_is_the_teachers_classifier_free_guidance():
    template = build_components(replace(train.EMBEDDED_SPEC, num_double=1, num_single=1), seed=0)["transformer"]
    teacher = train._with_depth(template, 1, 2, seed=1)
    inputs = dict(flow_inputs(teacher), guidance=torch.full((2,), sum(train.GUIDANCE_RANGE) / 2))
    generator = torch.Generator().manual_seed(9)
    unconditional = (
        torch.randn(8, template.config.joint_attention_dim, generator=generator),
        torch.randn(template.config.pooled_projection_dim, generator=generator),
    )
    conditional = teacher(**inputs)[0]
    free = teacher(
        **dict(
            inputs,
            encoder_hidden_states=unconditional[0].expand(2, -1, -1),
            pooled_projections=unconditional[1].expand(2, -1),
        )
    )[0]
    assert (conditional - free).abs().max() > 1e-3  # the caption matters, so the guidance scale does
    guided = train._guided_velocity(teacher, dict(inputs, guidance=torch.tensor([1.0, 2.5])), unconditional)
    torch.testing.assert_close(guided[0], conditional[0])
    torch.testing.assert_close(guided[1], free[1] + 2.5 * (conditional[1] - free[1]))


def test_shape_weighted_tokens_cover_every_rendered_shape_and_little_else():
    """The flow loss weights the tokens of the shape's box more (``_token_weights``): every pixel a jittered render
    draws in the shape's colour must fall in a weighted token, and the background must keep most of the tokens."""
    size = train.EMBEDDED_SPEC.native_size
    side = size // 16  # packed tokens: 8x VAE, then 2x2 patches
    rng = np.random.default_rng(0)
    for scene in all_scenes():
        weights = train._token_weights(scene, side).view(side, side)
        assert set(weights.unique().tolist()) == {1.0, train.SHAPE_LOSS_WEIGHT}
        assert (weights == train.SHAPE_LOSS_WEIGHT).float().mean() <= 0.375
        for _ in range(3):
            pixels = np.asarray(render(scene, size, rng), dtype=float)
            shape_pixels = np.abs(pixels - BACKGROUND_COLOURS[scene.background]).sum(axis=2) > 30
            rows, cols = np.nonzero(shape_pixels)
            assert (weights[rows // 16, cols // 16] == train.SHAPE_LOSS_WEIGHT).all(), scene


def test_the_command_reruns_itself_with_the_same_kernels_on_every_x86_cpu():
    pinned = train._kernel_environment({"HOME": "/root"}, "x86_64")
    assert pinned == {"HOME": "/root", **train.PINNED_KERNELS}
    assert train._kernel_environment(pinned, "x86_64") is None  # the rerun itself goes on
    assert train._kernel_environment({}, "aarch64") is None
    # what the variables do: torch takes AVX2 kernels even where it would take wider ones
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    held = subprocess.run([sys.executable, "-c", probe], env=pinned, capture_output=True, text=True, check=True)
    assert held.stdout.strip() == ("AVX2" if free in ("AVX2", "AVX512") else free)
