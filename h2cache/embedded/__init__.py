"""The embedded model: a small FLUX-architecture pipeline that runs anywhere, offline.

``load_embedded()`` returns the trained model shipped in ``tiny-flux/`` (a standard diffusers folder) when it is
present, and otherwise a random-weight pipeline of the same architecture, saying so. Either draws from a plain
``pipe(prompt)``: the call fills in the model's own defaults (16 T5 tokens, not FluxPipeline's 512) for whatever
the caller leaves out. ``build_pipeline(spec)``
always builds random weights, for fast unit tests of the cache mechanics.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .builder import EMBEDDED_SPEC, FLUX_PROPORTIONED, TinyFluxSpec, build_pipeline, finish_pipeline

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
    # Float32, the dtype every CPU test compares in (the training script stores the transformer in float16 to fit
    # 25 MB; diffusers loads it back as float32 by default as well).
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    defaults = json.loads((folder / CALL_DEFAULTS_FILE).read_text())
    call_defaults = {
        key: defaults[key]
        for key in ("max_sequence_length", "num_inference_steps", "guidance_scale")
        if key in defaults
    }
    pipe = finish_pipeline(pipe, defaults["native_size"], call_defaults)
    # One projection for query, key and value instead of three (diffusers' own option): at this width each linear
    # costs its call more than its arithmetic. On this project's CPU VM the latents stayed bit for bit the same (the
    # reduction over the input width is the same); with inference mode (see the call) the image takes 13% less time.
    pipe.transformer.fuse_qkv_projections()
    return pipe


def is_embedded(pipe) -> bool:
    """Whether ``pipe`` is an embedded pipeline (shipped, trained elsewhere or random), which only knows a few words."""
    return hasattr(pipe, "h2cache_call_defaults")


def vocabulary_of(pipe) -> list[str]:
    """The words an embedded pipeline's T5 tokenizer knows (special tokens left out), in the tokenizer's order."""
    tokenizer = pipe.tokenizer_2
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return [word for word, _ in vocabulary if word not in tokenizer.all_special_tokens]


def unknown_words(pipe, prompt: str) -> list[str]:
    """The words of ``prompt`` an embedded pipeline never saw (its T5 tokenizer maps them to the unknown token)."""
    tokenizer = pipe.tokenizer_2
    encoding = tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False)
    unknown = [
        prompt[start:end]
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True)
        if token_id == tokenizer.unk_token_id
    ]
    return list(dict.fromkeys(unknown))


def load_embedded(seed: int = 0):
    """The shipped trained model, or (if this checkout has none) a random-weight one of the default spec."""
    if shipped_model_available():
        return load_folder(SHIPPED_FOLDER)
    warnings.warn(f"no trained embedded model at {SHIPPED_FOLDER}; using random weights (it draws noise)", stacklevel=2)
    return build_pipeline(FLUX_PROPORTIONED, seed=seed)


__all__ = [
    "CALL_DEFAULTS_FILE",
    "EMBEDDED_SPEC",
    "FLUX_PROPORTIONED",
    "SHIPPED_FOLDER",
    "TinyFluxSpec",
    "build_pipeline",
    "is_embedded",
    "load_embedded",
    "load_folder",
    "shipped_model_available",
    "unknown_words",
    "vocabulary_of",
]
