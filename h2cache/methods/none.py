"""No cache: every block at every step, through h2cache's own forward (the baseline and the overhead reference)."""

from __future__ import annotations

from ..trace import MISS, StageDecision
from .base import CacheMethod


class NoCache(CacheMethod):
    def step(self, run, state, streams):
        streams = run.double_blocks(streams, 0)
        joint = run.single_blocks(run.enter_single(streams), 0)
        return run.leave_single(joint), StageDecision(MISS), StageDecision(MISS)
