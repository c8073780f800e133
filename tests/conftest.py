import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from h2cache.embedded import TinyFluxSpec, build_pipeline  # noqa: E402

PROMPT = "a small red circle on a blue background"


@pytest.fixture
def make_pipe():
    """A fresh random-weight tiny FluxPipeline (same weights for the same spec and seed)."""

    def make(spec: TinyFluxSpec | None = None, seed: int = 0):
        return build_pipeline(spec or TinyFluxSpec(), seed=seed)

    return make


def generate(pipe, prompt=PROMPT, steps=8, seed=0, **kwargs):
    """Packed latents of one call, deterministic from ``seed``."""
    options = dict(num_inference_steps=steps, max_sequence_length=32, output_type="latent", guidance_scale=3.5)
    options.update(kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **options).images


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and no real caches: homes point into tmp_path, sockets cannot connect, no weights dir is set."""
    import socket

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    for name, folder in (("HOME", "home"), ("TORCH_HOME", "torch"), ("HF_HOME", "hf")):
        monkeypatch.setenv(name, str(tmp_path / folder))
    monkeypatch.delenv("METRICS_WEIGHTS_DIR", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def count_block_calls(doubles, singles) -> dict:
    """Forward hooks on the real blocks: how many double and single blocks actually executed."""
    counts = {"double": 0, "single": 0}
    for kind, blocks in (("double", doubles), ("single", singles)):
        for block in blocks:
            block.register_forward_hook(lambda *_, kind=kind: counts.__setitem__(kind, counts[kind] + 1))
    return counts


@pytest.fixture
def run():
    return generate
