"""Block Cache: nunchaku's first-block cache, adapted from ParaAttention (the H2-Cache paper's "Block Cache").

Source: nunchaku-tech/nunchaku @ 3a3cc3d, ``nunchaku/caching/utils.py`` (``use_double_fb_cache=False``). Default
threshold 0.12. Double block 0 always runs; its image-stream residual is compared (relative L1, strict ``<``) with
the one stored at the last miss. A hit adds the cached residual of *all* other blocks, double and single, to both
streams; a miss runs them and refreshes the cache. No warm-up, no limits: only the first step is forced.
"""

from __future__ import annotations

from ..pfs import summarize
from ..trace import FORCED, MISS, StageDecision
from .base import CacheMethod, StageMemory


class FBCache(CacheMethod):
    def new_state(self) -> StageMemory:
        return StageMemory()

    def step(self, run, state: StageMemory, streams):
        probe = run.double_blocks(streams, 0, 1)
        summary = summarize(probe.img - streams.img, self.config.pool)
        decision = state.judge(summary, self.config.threshold)
        streams = state.advance(decision, probe, summary, lambda h: self._rest(run, h))
        return streams, decision, StageDecision(MISS if decision.decision == MISS else FORCED)

    @staticmethod
    def _rest(run, streams):
        return run.rest_of_model(streams, 1)
