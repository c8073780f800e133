"""H2-Cache: a hierarchical dual-stage cache (Sung, Kim, Yun, Kang; arXiv 2510.27171).

Source of the semantics: the official code, github.com/Bluear7878/H2-cache-A-Hierarchical-Dual-Stage-Cache @ d7fe7ff
(``caching/utils.py``), as ``shared/specs/h2-cache.md`` states them. Defaults: tau1 = 0.15, tau2 = 0.22, PFS divisors
2048 / 384. Per step:

  stage 1 (structure, double blocks): run block 0; compare its image residual with the one stored at the stage's
      last miss, by PFS thumbnails and relative L1. Below tau1, add the cached residual of blocks 1..; else run them.
  stage 2 (detail, single blocks): run block 0 on [txt; img]; a stage-1 hit forces reuse ("official" mode), else
      compare its residual the same way against tau2.

Not copied from the official code: the crash below 2048 image tokens (the pooling kernel is clamped to >= 1), the
whole-batch decision (decisions are per sample, and a stage is reused only if every sample passes), and the bf16
metric (float32 here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import H2CacheConfig
from ..pfs import summarize
from ..trace import FORCED, HIT, StageDecision
from .base import CacheMethod, StageMemory


@dataclass
class H2State:
    structure: StageMemory = field(default_factory=StageMemory)
    detail: StageMemory = field(default_factory=StageMemory)


class H2Cache(CacheMethod):
    def __init__(self, config: H2CacheConfig):
        super().__init__(config)
        self.rule = config  # the H2 parameters step() applies; a variant may derive them from its own config

    def new_state(self) -> H2State:
        return H2State()

    def step(self, run, state: H2State, streams):
        config = self.rule
        pool1, pool2 = (config.pool1, config.pool2) if config.pfs else (None, None)

        probe = run.double_blocks(streams, 0, 1)
        summary1 = summarize(probe.img - streams.img, pool1)
        stage1 = state.structure.judge(summary1, config.tau1)
        streams = state.structure.advance(stage1, probe, summary1, lambda h: run.double_blocks(h, 1))

        joint = run.enter_single(streams)
        probe = run.single_blocks(joint, 0, 1)
        if stage1.decision == HIT and config.mode == "official":
            stage2, summary2 = StageDecision(FORCED), None
        else:
            summary2 = summarize(run.single_tokens(probe) - run.single_tokens(joint), pool2)
            stage2 = state.detail.judge(summary2, config.tau2)
        joint = state.detail.advance(stage2, probe, summary2, lambda h: run.single_blocks(h, 1))
        return run.leave_single(joint), stage1, stage2
