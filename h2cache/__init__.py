"""h2cache: H2-Cache and the caches it is compared with, for FLUX on diffusers and nunchaku.

import h2cache
pipe = h2cache.load_pipeline("tiny")                 # or your own FluxPipeline (diffusers or nunchaku)
h2cache.apply(pipe, "h2", tau1=0.15, tau2=0.22)      # one call; applying again replaces, never stacks
image = pipe("a red circle at the top").images[0]    # a plain call: the model's own defaults
print(h2cache.summary(pipe)); h2cache.remove(pipe)   # per-step trace: h2cache.stats(pipe)
"""

from __future__ import annotations

from .backends import UnsupportedCall, detect_backend, foreign_cache, unwrap
from .config import (
    DBFCacheConfig,
    FBCacheConfig,
    H2CacheConfig,
    H2ForecastConfig,
    HiCacheConfig,
    NoCacheConfig,
    TaylorSeerConfig,
    TeaCacheConfig,
)
from .controller import CacheController
from .methods import METHODS, build_method
from .models import load_pipeline
from .trace import totals

__version__ = "0.1.0"


def _transformer_of(target):
    return unwrap(getattr(target, "transformer", target))


def apply(target, method="h2", **params):
    """Put a cache on a pipeline (anything with ``.transformer``) or on a FLUX transformer; returns ``target``.

    ``method`` is a name from ``h2cache.METHODS`` with its parameters as keywords, or a config object. On a
    pipeline, the cache state is reset at the start of every call; on a bare transformer, when a new denoising
    run begins (the timestep goes up) or on ``h2cache.reset``.
    """
    cache_method = build_method(method, **params)
    transformer = _transformer_of(target)
    backend = detect_backend(transformer)
    if getattr(target, "controlnet", None) is not None:
        message = backend.refusal(None, controlnet=True)
        if message is not None:
            raise UnsupportedCall(f"h2cache: this pipeline has a ControlNet; {message}")
    controller = getattr(transformer, "_h2cache_controller", None)
    if controller is not None:
        controller.uninstall()
    else:
        other = foreign_cache(transformer)
        if other is not None:
            raise RuntimeError(f"{other} is already installed on this transformer: remove it before h2cache.apply")
    controller = CacheController(transformer, cache_method)
    controller.install()
    if transformer is not target:
        controller.scheduler = getattr(target, "scheduler", None)
        _bind_sessions(target)
    return target


def remove(target):
    """Take the cache off: the original forward (and pipeline class) are back. Returns ``target``."""
    transformer = _transformer_of(target)
    controller = getattr(transformer, "_h2cache_controller", None)
    if controller is not None:
        controller.uninstall()
    base = type(target).__dict__.get("_h2cache_base_class")
    if base is not None:
        target.__class__ = base
    return target


def controller_of(target) -> CacheController:
    controller = getattr(_transformer_of(target), "_h2cache_controller", None)
    if controller is None:
        raise RuntimeError("no h2cache on this model: call h2cache.apply(pipe, ...) first")
    return controller


def stats(target) -> list[dict]:
    """The last generation's per-step trace (one dict per transformer forward and CFG branch)."""
    return [record.as_dict() for record in controller_of(target).records]


def summary(target) -> dict:
    """Totals over the last generation's trace: blocks run, blocks a full computation runs, hits per stage."""
    return totals(stats(target))


def reset(target) -> None:
    """Forget all cached residuals and the trace (a new generation with a bare transformer)."""
    controller_of(target).reset()


def _bind_sessions(pipe) -> None:
    """Reset the cache at every call of *this* pipeline instance: its class becomes a same-named subclass whose
    ``__call__`` opens a session. ``__call__`` is looked up on the type, so an instance attribute would be ignored,
    and patching the class itself would reach every pipeline of that class."""
    if "_h2cache_base_class" in type(pipe).__dict__:
        return
    base = type(pipe)

    def __call__(self, *args, **kwargs):
        controller = getattr(_transformer_of(self), "_h2cache_controller", None)
        if controller is None:
            return base.__call__(self, *args, **kwargs)
        # Refuse what the transformer cannot run before the text encoders and the first steps spend time on it.
        controller.check_call(kwargs.get("joint_attention_kwargs"), controlnet=False)
        with controller.session():
            return base.__call__(self, *args, **kwargs)

    namespace = {"__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__}
    pipe.__class__ = type(base.__name__, (base,), {**namespace, "_h2cache_base_class": base})


__all__ = [
    "METHODS",
    "CacheController",
    "DBFCacheConfig",
    "FBCacheConfig",
    "H2CacheConfig",
    "H2ForecastConfig",
    "HiCacheConfig",
    "NoCacheConfig",
    "TaylorSeerConfig",
    "TeaCacheConfig",
    "UnsupportedCall",
    "apply",
    "controller_of",
    "load_pipeline",
    "remove",
    "reset",
    "stats",
    "summary",
]
