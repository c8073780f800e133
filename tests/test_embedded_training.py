"""The training script's promises, on a shrunken copy of its recipe: a resumed run computes what an unbroken one
would, the exported folder loads as a pipeline, and the decoder phase leaves the encoder (the flow model's latent
space) untouched."""

import json
from dataclasses import replace

import pytest
import torch

import h2cache.embedded.train as train
from h2cache.embedded import CALL_DEFAULTS_FILE, load_folder
from h2cache.embedded.builder import build_components


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
        "FLOW_STEPS": 3,
        "FLOW_BATCH": 2,
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
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)


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


def test_grown_model_computes_what_the_shallow_model_did_and_trains_every_block():
    template = build_components(replace(train.EMBEDDED_SPEC, num_double=1, num_single=1), seed=0)["transformer"]
    shallow = train._with_depth(template, 2, 4, seed=1)  # default initialisation: every block changes its input
    deep = train._grow(shallow, train._with_depth(template, 5, 9, seed=2))
    inputs = flow_inputs(shallow)
    reference = shallow(**inputs)[0]
    output = deep(**inputs)[0]
    assert torch.equal(output, reference)
    # Each stage still opens with a trained block (a first-block cache's probe) and no block is frozen out.
    assert torch.equal(deep.transformer_blocks[0].attn.to_q.weight, shallow.transformer_blocks[0].attn.to_q.weight)
    output.pow(2).mean().backward()
    for block in [*deep.transformer_blocks, *deep.single_transformer_blocks]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
