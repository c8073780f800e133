"""Per-step records of what a cache decided and what ran: the one format stats, plots and the eval runner read."""

from __future__ import annotations

from dataclasses import asdict, dataclass

MISS = "miss"  # the stage ran in full and its cache was refreshed
HIT = "hit"  # the stage's probe was close enough: the cached residual replaced the rest of the stage
FORCED = "forced"  # stage 2 reused, unjudged, because stage 1 hit ("official" and "chained" modes)


@dataclass
class StageDecision:
    """What a method decided for one stage of one step; ``distance`` is None when nothing was measured."""

    decision: str
    distance: float | None = None


@dataclass
class StepRecord:
    """One transformer forward of one CFG branch.

    ``d1``/``d2`` are the distances the decisions compared with the thresholds; with a batch, the largest
    per-sample distance (the batch reuses a stage only when every sample is below the threshold).
    """

    branch: str
    step: int
    timestep: float
    stage1: str
    d1: float | None
    stage2: str
    d2: float | None
    double_blocks_run: int
    single_blocks_run: int
    double_blocks_total: int
    single_blocks_total: int

    def as_dict(self) -> dict:
        return asdict(self)


def totals(records: list[dict]) -> dict:
    """Blocks run against blocks a full computation runs, and the resulting block speedup."""
    run = sum(r["double_blocks_run"] + r["single_blocks_run"] for r in records)
    total = sum(r["double_blocks_total"] + r["single_blocks_total"] for r in records)
    return {
        "steps": len(records),
        "double_blocks_run": sum(r["double_blocks_run"] for r in records),
        "single_blocks_run": sum(r["single_blocks_run"] for r in records),
        "blocks_run": run,
        "blocks_total": total,
        "speedup_blocks": total / run if run else None,
        "stage1_hits": sum(r["stage1"] == HIT for r in records),
        "stage2_hits": sum(r["stage2"] in (HIT, FORCED) for r in records),
    }
