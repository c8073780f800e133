"""No cache: every block at every step, through h2cache's own forward (the reference for its overhead; the
baseline of timings is the unpatched pipeline)."""

from __future__ import annotations

from ..trace import MISS, StageDecision
from .base import CacheMethod


class NoCache(CacheMethod):
    def step(self, run, state, streams):
        return run.rest_of_model(streams, 0), StageDecision(MISS), StageDecision(MISS)
