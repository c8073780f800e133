"""The two token streams of a FLUX transformer, named so that no code depends on a backend's tuple order.

Double-stream blocks carry ``Streams(img, txt)``. The single-stream stage carries whatever the backend uses (a
``Streams`` for diffusers, the concatenated ``[txt; img]`` tensor for nunchaku); ``residual``/``add_residual`` work
on both, so a method can cache and reuse a stage without knowing which backend runs it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Streams(NamedTuple):
    img: torch.Tensor
    txt: torch.Tensor


StageState = Streams | torch.Tensor


def residual(after: StageState, before: StageState) -> StageState:
    """What a run of blocks added: ``after - before``, stream by stream."""
    if isinstance(after, Streams):
        return Streams(after.img - before.img, after.txt - before.txt)
    return after - before


def add_residual(state: StageState, delta: StageState) -> StageState:
    """Reuse a cached stage: ``state + delta``, stream by stream."""
    if isinstance(state, Streams):
        return Streams(state.img + delta.img, state.txt + delta.txt)
    return state + delta


def scaled(state: StageState, factor: float) -> StageState:
    """``factor * state``, stream by stream (finite differences and forecasts of a stage)."""
    if isinstance(state, Streams):
        return Streams(state.img * factor, state.txt * factor)
    return state * factor
