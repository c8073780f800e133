"""One timed pipeline call with the model's own defaults: what run.py and the experiment runner both do."""

from __future__ import annotations

import time

import torch

# FLUX.1-dev's usual call; the embedded model brings its own through ``pipe.h2cache_call_defaults``.
FLUX_CALL_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 3.5}


def check_call_values(steps=None, height=None, width=None) -> None:
    """Refuse a step count or size the pipeline cannot use (None means the model's default), naming the value."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 16):
            raise ValueError(f"{name} must be a positive multiple of 16, got {value}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def call_arguments(pipe, steps=None, guidance=None, height=None, width=None) -> dict:
    """The keyword arguments of a call: the model's defaults, overridden by whatever is not None."""
    call = dict(FLUX_CALL_DEFAULTS, **getattr(pipe, "h2cache_call_defaults", {}))
    overrides = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height, "width": width}
    call.update({key: value for key, value in overrides.items() if value is not None})
    return call


def timed_call(pipe, prompt: str, seed: int, call: dict):
    """The first image of ``pipe(prompt, ...)`` and the seconds it took, CUDA-synchronised on a GPU.

    The noise generator lives on the CPU so that a seed gives the same image on every device count and order.
    """
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    synchronize()
    start = time.perf_counter()
    image = pipe(prompt, generator=generator, **call).images[0]
    synchronize()
    return image, time.perf_counter() - start
