"""TeaCache4FLUX (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", CVPR 2025).

Source: ali-vilab/TeaCache @ 7c10efc, ``TeaCache4FLUX/teacache_flux.py``. Default threshold 0.6 and FLUX.1's rescale
polynomial. Unlike the probe-based caches it decides before any block runs, from double block 0's modulated image
input, and a reuse skips all blocks of the step: the image stream becomes its input plus the residual of the last
computed step. The reference indicator is refreshed at *every* step (step-to-step change), and the rescaled
changes accumulate until they reach the threshold. The official code counts calls in class attributes, so true
CFG breaks its schedule; here the count is the step index of the CFG branch's own state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..pfs import relative_l1
from ..streams import Streams
from ..trace import FORCED, HIT, MISS, StageDecision
from .base import CacheMethod


class TeaCacheAccumulator:
    """The published decision rule, on per-sample indicator changes: ``compute(step, change) -> (bool, value)``."""

    def __init__(self, threshold: float, coefficients, num_steps: int | None):
        self.threshold = threshold
        self.rescale = np.poly1d(coefficients)
        self.num_steps = num_steps
        self.accumulated = None

    def compute(self, step: int, change: np.ndarray | None) -> tuple[bool, np.ndarray | None]:
        is_last = self.num_steps is not None and step == self.num_steps - 1
        if step == 0 or is_last or change is None:
            self.accumulated = np.zeros(1 if change is None else len(change))
            return True, None
        self.accumulated = self.accumulated + self.rescale(change)
        value = self.accumulated.copy()
        if (self.accumulated < self.threshold).all():
            return False, value
        self.accumulated = np.zeros_like(self.accumulated)
        return True, value


@dataclass
class TeaCacheState:
    accumulator: TeaCacheAccumulator
    previous_indicator: torch.Tensor | None = None
    image_residual: torch.Tensor | None = None


class TeaCache(CacheMethod):
    def new_state(self) -> TeaCacheState:
        config = self.config
        return TeaCacheState(TeaCacheAccumulator(config.threshold, config.coefficients, config.num_steps))

    def step(self, run, state: TeaCacheState, streams):
        if state.accumulator.num_steps is None:
            state.accumulator.num_steps = self.config.num_steps or run.num_steps
        indicator = run.modulated_input(streams).float()
        change = None
        if state.previous_indicator is not None and state.previous_indicator.shape == indicator.shape:
            change = relative_l1(state.previous_indicator, indicator).cpu().numpy()
        state.previous_indicator = indicator
        compute, accumulated = state.accumulator.compute(run.step_index, change)
        distance = None if accumulated is None else float(accumulated.max())
        if not compute and state.image_residual is not None:
            reused = Streams(streams.img + state.image_residual, streams.txt)
            return reused, StageDecision(HIT, distance), StageDecision(FORCED)

        output = run.rest_of_model(streams, 0)
        state.image_residual = output.img - streams.img
        return output, StageDecision(MISS, distance), StageDecision(MISS)
