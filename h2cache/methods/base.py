"""The method interface, and the residual memory that probe-based methods share.

A method receives a ``BlockRunner`` (run double/single blocks by index, enter and leave the single stage) and the
streams after the prologue; it returns the streams before the epilogue and what it decided for each stage. It
never sees which backend runs the blocks, and it holds all its memory in the state object it creates, which the
controller keeps per model, per CFG branch and per pipeline call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..pfs import relative_l1
from ..streams import StageState, add_residual, residual
from ..trace import MISS, StageDecision


class CacheMethod:
    """Base class: ``new_state()`` for a fresh generation, ``step()`` for one transformer forward."""

    def __init__(self, config):
        self.config = config

    def new_state(self) -> Any:
        return None

    def step(self, run, state, streams) -> tuple[Any, StageDecision, StageDecision]:
        raise NotImplementedError


@dataclass
class StageMemory:
    """One stage's cache: the probe summary and the residual of the stage's remaining blocks, both taken at the
    stage's last miss. Hits leave both untouched, so drift is measured against that anchor and runs of hits
    end by themselves."""

    reference: torch.Tensor | None = None
    residual: StageState | None = None

    def judge(self, summary: torch.Tensor, threshold: float) -> StageDecision:
        """Hit when every sample's relative L1 to the reference is strictly below ``threshold``."""
        if self.reference is None or self.reference.shape != summary.shape:
            return StageDecision(MISS)
        distances = relative_l1(self.reference, summary)
        hit = bool((distances < threshold).all())
        return StageDecision("hit" if hit else MISS, float(distances.max()))

    def advance(
        self,
        decision: StageDecision,
        probe_output: StageState,
        summary: torch.Tensor | None,
        run_rest: Callable[[StageState], StageState],
    ) -> StageState:
        """Reuse the cached residual on a hit (or a forced hit); on a miss run the rest and refresh the memory."""
        if decision.decision != MISS:
            return add_residual(probe_output, self.residual)
        self.reference = summary
        output = run_rest(probe_output)
        self.residual = residual(output, probe_output)
        return output
