"""Loading pipelines: the embedded model, a local diffusers folder or hub id, or nunchaku's 4-bit transformers."""

from __future__ import annotations

from . import embedded

EMBEDDED_NAMES = {
    "tiny": "the shipped trained embedded model (random weights if this checkout has none)",
    "random": "a random-weight embedded model (mechanics only; draws noise)",
    "flux-proportioned": "random weights, FLUX.1's 19 double + 38 single blocks at reduced width",
}


def load_pipeline(model: str = "tiny", seed: int = 0):
    """A ``FluxPipeline`` by name: ``"tiny"``, ``"random"``, ``"flux-proportioned"`` or a local diffusers folder."""
    if model == "tiny":
        return embedded.load_embedded(seed=seed)
    if model == "random":
        return embedded.build_pipeline(embedded.TinyFluxSpec(), seed=seed)
    if model == "flux-proportioned":
        return embedded.build_pipeline(embedded.FLUX_PROPORTIONED, seed=seed)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(EMBEDDED_NAMES)}")
