"""The training script's promises, on a shrunken copy of its recipe: a resumed run computes what an unbroken one
would, the exported folder loads as a pipeline, and the decoder phase leaves the encoder (the flow model's latent
space) untouched."""

from dataclasses import replace

import pytest
import torch

import h2cache.embedded.train as train
from h2cache.embedded import load_folder


@pytest.fixture
def small_recipe(monkeypatch):
    monkeypatch.setattr(train, "EMBEDDED_SPEC", replace(train.EMBEDDED_SPEC, num_double=1, num_single=2))
    for name, value in {
        "VAE_STEPS": 2,
        "VAE_BATCH": 2,
        "LATENT_STATS_IMAGES": 4,
        "DECODER_STEPS": 2,
        "FLOW_STEPS": 3,
        "FLOW_BATCH": 2,
        "WARMUP_STEPS": 1,
        "CHECKPOINT_EVERY": 1,
    }.items():
        monkeypatch.setattr(train, name, value)


def train_in_process(out, stop_flow_after=None):
    """Phases 1 and 2 (and 3) in this process; ``stop_flow_after`` simulates a kill and a rerun of the command."""
    trainer = train.Trainer(out, seed=3)
    record = {"autoencoder": {"steps": train.VAE_STEPS, "seconds": trainer.train_autoencoder()}}
    if stop_flow_after is not None:
        full = train.FLOW_STEPS
        train.FLOW_STEPS = stop_flow_after
        trainer.train_flow(record)
        train.FLOW_STEPS = full
        trainer = train.Trainer(out, seed=3)
        trainer.train_autoencoder()
    ema, _ = trainer.train_flow(record)
    encoder_before = {k: v.clone() for k, v in trainer.vae.encoder.state_dict().items()}
    trainer.refine_decoder()
    assert all(torch.equal(v, encoder_before[k]) for k, v in trainer.vae.encoder.state_dict().items())
    trainer.export(ema, record)
    return torch.load(out / "flow.pt", weights_only=True)


def test_resumed_training_equals_an_unbroken_run_and_exports_a_pipeline(small_recipe, tmp_path):
    torch.set_num_threads(1)
    unbroken = train_in_process(tmp_path / "unbroken")
    resumed = train_in_process(tmp_path / "resumed", stop_flow_after=1)
    assert unbroken["step"] == resumed["step"] == 3
    for key, value in unbroken["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    pipe = load_folder(tmp_path / "resumed" / "tiny-flux")
    assert pipe.transformer.config.num_layers == 1
    assert pipe.h2cache_call_defaults["max_sequence_length"] == train.EMBEDDED_SPEC.max_sequence_length
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)
