"""The embedded model: a small FLUX-architecture pipeline that runs anywhere, offline.

``load_embedded()`` returns the trained model shipped in ``tiny-flux/`` (a standard diffusers folder) when it is
present, and otherwise a random-weight pipeline of the same architecture, saying so. ``build_pipeline(spec)``
always builds random weights, for fast unit tests of the cache mechanics.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .builder import FLUX_PROPORTIONED, TinyFluxSpec, build_pipeline, finish_pipeline

SHIPPED_FOLDER = Path(__file__).with_name("tiny-flux")
# Written beside model_index.json by the training script: what a call needs to draw as the model was trained.
CALL_DEFAULTS_FILE = "h2cache_embedded.json"


def shipped_model_available() -> bool:
    return (SHIPPED_FOLDER / "model_index.json").is_file()


def load_folder(folder: str | Path):
    """Load an embedded-model diffusers folder offline and apply its recorded call defaults."""
    import torch
    from diffusers import FluxPipeline

    folder = Path(folder)
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    defaults = json.loads((folder / CALL_DEFAULTS_FILE).read_text())
    pipe.h2cache_call_defaults = {
        key: defaults[key]
        for key in ("max_sequence_length", "num_inference_steps", "guidance_scale")
        if key in defaults
    }
    return finish_pipeline(pipe, defaults["native_size"])


def load_embedded(seed: int = 0):
    """The shipped trained model, or (if this checkout has none) a random-weight one of the default spec."""
    if shipped_model_available():
        return load_folder(SHIPPED_FOLDER)
    warnings.warn(f"no trained embedded model at {SHIPPED_FOLDER}; using random weights (it draws noise)", stacklevel=2)
    return build_pipeline(TinyFluxSpec(), seed=seed)


__all__ = [
    "CALL_DEFAULTS_FILE",
    "FLUX_PROPORTIONED",
    "SHIPPED_FOLDER",
    "TinyFluxSpec",
    "build_pipeline",
    "load_embedded",
    "load_folder",
    "shipped_model_available",
]
