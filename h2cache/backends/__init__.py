"""Backend detection by class name: nunchaku is never imported to find out whether a model is nunchaku's."""

from __future__ import annotations

import inspect

from .base import Backend, BlockContext, UnsupportedCall
from .diffusers import DiffusersBackend
from .nunchaku import NunchakuV1Backend, NunchakuV2Backend

NUNCHAKU_V2_CLASS = "NunchakuFluxTransformer2DModelV2"
NUNCHAKU_V1_CLASS = "NunchakuFluxTransformer2dModel"  # lowercase "d", as nunchaku spells it


def unwrap(model):
    """The module behind ``torch.compile``'s wrapper, where the cache must be installed."""
    return getattr(model, "_orig_mod", model)


def foreign_cache(model) -> str | None:
    """Name of another library's cache already installed on ``model``, or None."""
    # nunchaku's V1 adapter sets _original_forward and _original_blocks at once, but _is_cached and
    # cached_transformer_blocks only at the first cached call; its V2 adapter sets _original_forward, its
    # thresholds and _is_cached at once and keeps no block lists.
    if hasattr(model, "_original_blocks") or hasattr(model, "cached_transformer_blocks"):
        return "nunchaku's V1 first-block cache (nunchaku.caching.diffusers_adapters.flux)"
    if hasattr(model, "_original_forward") or getattr(model, "_is_cached", False):
        return "nunchaku's V2 first-block cache (nunchaku.caching.diffusers_adapters.flux_v2)"
    if getattr(model, "_cache_config", None) is not None:
        return f"diffusers' {type(model._cache_config).__name__} (transformer.enable_cache)"
    return None


def detect_backend(model) -> Backend:
    """The backend that runs ``model``'s blocks; raises for anything that is not a FLUX transformer."""
    model = unwrap(model)
    class_names = {cls.__name__ for cls in type(model).__mro__}
    if NUNCHAKU_V2_CLASS in class_names:
        return NunchakuV2Backend(model)
    if NUNCHAKU_V1_CLASS in class_names:
        blocks = model.transformer_blocks
        if len(blocks) != 1 or not hasattr(blocks[0], "m") or len(model.single_transformer_blocks):
            raise TypeError(f"{type(model).__name__} does not have nunchaku V1's layout (one fused block with .m)")
        return NunchakuV1Backend(model)
    if "FluxTransformer2DModel" in class_names:
        singles = model.single_transformer_blocks
        if len(singles) and "encoder_hidden_states" not in inspect.signature(type(singles[0]).forward).parameters:
            raise TypeError("single blocks take no encoder_hidden_states (diffusers < 0.35): upgrade diffusers")
        return DiffusersBackend(model)
    raise TypeError(f"h2cache needs a FLUX transformer; got {type(model).__name__}")


__all__ = ["Backend", "BlockContext", "UnsupportedCall", "detect_backend", "foreign_cache", "unwrap"]
