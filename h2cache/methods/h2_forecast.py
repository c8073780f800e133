"""H2-Forecast: H2-Cache's probes decide, forecasting fills in (this project's method; ``H2ForecastConfig``).

Per step and stage, as in H2-Cache: the stage's first block runs as a probe, and its residual's PFS thumbnail is
compared with earlier ones. Unlike H2-Cache:

  - the distance is, by default, the probe's own forecast error: the probe's thumbnail is extrapolated from its
    values at the stage's computed steps exactly as the rest of the stage is, and compared (relative L1) with the
    thumbnail it really has; alternatives are TeaCache's accumulated step-to-step distance and H2-Cache's anchor;
  - a reused stage adds a forecast of its remaining blocks' residual, extrapolated from the stage's last full
    computations with ``forecast.py``'s finite differences (TaylorSeer) or scaled Hermite basis (HiCache);
  - stage 2 is judged on its own probe even when stage 1 hit (``mode="official"`` restores the forced reuse;
    ``mode="chained"`` forecasts stage 2 whole after a stage-1 hit, probe included, so such a step runs one block);
  - the first ``warmup`` steps are computed, and a stage is recomputed after ``max_run`` (a share of the call's
    steps) forecasts in a row.

Everything is per sample where it can be: distances accumulate per sample, and a stage is forecast only when every
sample of the batch is below the threshold; the forecast itself is elementwise, so each sample extrapolates its own
residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

from ..config import H2ForecastConfig
from ..pfs import relative_l1, summarize
from ..streams import StageState, add_residual, residual
from ..trace import FORCED, HIT, MISS, StageDecision
from .base import CacheMethod
from .forecast import extrapolate, hermite_coefficient, refreshed_differences, taylor_coefficient


@dataclass
class StageHistory:
    """One stage's memory: the probe thumbnails it compares, and the finite differences of its computed residuals."""

    previous: torch.Tensor | None = None  # last step's probe thumbnail
    anchor: torch.Tensor | None = None  # the probe thumbnail of the last miss
    accumulated: torch.Tensor | None = None  # per sample, the distance summed since the last miss
    differences: list = field(default_factory=list)  # [F, D1 F, ...] of the stage's remaining blocks' residual
    computed_steps: list[int] = field(default_factory=list)
    hits_in_row: int = 0

    probe_differences: list = field(default_factory=list)  # the same for the probe's thumbnail
    whole_differences: list = field(default_factory=list)  # the same for the whole stage, probe included (chained)

    def distance(self, summary: torch.Tensor, kind: str, step: int, coefficient) -> torch.Tensor | None:
        """Per-sample distance of this step's probe, or None when there is nothing comparable yet."""
        if self.previous is None or self.previous.shape != summary.shape:
            return None
        if kind == "accumulated":
            return self.accumulated + relative_l1(self.previous, summary)
        if kind == "anchor":
            return relative_l1(self.anchor, summary)
        # how far the probe is from its own forecast: the error the rest of the stage's forecast would share
        expected = extrapolate(self.probe_differences, step - self.computed_steps[-1], coefficient)
        return relative_l1(summary, expected)


@dataclass
class H2ForecastState:
    structure: StageHistory = field(default_factory=StageHistory)
    detail: StageHistory = field(default_factory=StageHistory)


class H2Forecast(CacheMethod):
    def __init__(self, config: H2ForecastConfig):
        super().__init__(config)
        if config.basis == "hermite":
            self.coefficient = partial(hermite_coefficient, scale=config.scale)
        else:
            self.coefficient = taylor_coefficient

    def new_state(self) -> H2ForecastState:
        return H2ForecastState()

    def step(self, run, state: H2ForecastState, streams):
        config = self.config
        probe = run.double_blocks(streams, 0, 1)
        summary1 = summarize(probe.img - streams.img, config.pool1)
        stage1 = self.judge(state.structure, summary1, config.tau1, run.step_index, run.num_steps)
        streams = self.advance(
            state.structure, stage1, probe, summary1, run.step_index, lambda h: run.double_blocks(h, 1)
        )

        joint = run.enter_single(streams)
        chained = config.mode == "chained"
        if chained and stage1.decision == HIT and not self.capped(state.detail, run.num_steps):
            # nothing of stage 2 runs, so there is no thumbnail: the next judged step compares with the last one
            joint = self.forecast(state.detail, state.detail.whole_differences, joint, run.step_index)
            return run.leave_single(joint), stage1, StageDecision(FORCED)
        probe = run.single_blocks(joint, 0, 1)
        summary2 = summarize(run.single_tokens(probe) - run.single_tokens(joint), config.pool2)
        if stage1.decision == HIT and config.mode == "official":
            stage2 = StageDecision(FORCED)
        else:
            stage2 = self.judge(state.detail, summary2, config.tau2, run.step_index, run.num_steps)
        joint = self.advance(
            state.detail,
            stage2,
            probe,
            summary2,
            run.step_index,
            lambda h: run.single_blocks(h, 1),
            stage_input=joint if chained else None,
        )
        return run.leave_single(joint), stage1, stage2

    def judge(self, history: StageHistory, summary, threshold: float, step: int, num_steps=None) -> StageDecision:
        """Hit when past warm-up, within the cap, and every sample's distance is strictly below ``threshold``."""
        if not history.computed_steps:
            return StageDecision(MISS)
        distances = history.distance(summary, self.config.distance, step, self.coefficient)
        if distances is None:
            return StageDecision(MISS)
        hit = step >= self.config.warmup and not self.capped(history, num_steps) and bool((distances < threshold).all())
        if hit:
            history.accumulated = distances
        return StageDecision(HIT if hit else MISS, float(distances.max()))

    def capped(self, history: StageHistory, num_steps: int | None) -> bool:
        """Whether the stage has been forecast ``max_run`` (a share of the call's steps) times in a row."""
        if self.config.max_run is None or num_steps is None:
            return False
        return history.hits_in_row >= max(1, math.floor(self.config.max_run * num_steps + 1e-9))

    def advance(
        self,
        history: StageHistory,
        decision: StageDecision,
        probe_output: StageState,
        summary,
        step,
        run_rest,
        stage_input: StageState | None = None,
    ):
        """Add the forecast residual on a (forced) hit; on a miss run the rest and refresh the differences.

        With ``stage_input`` the differences of the whole stage's residual are kept too (``mode="chained"``).
        """
        history.previous = summary
        if decision.decision != MISS:
            return self.forecast(history, history.differences, probe_output, step)
        output = run_rest(probe_output)
        spacing = step - history.computed_steps[-1] if history.computed_steps else 1
        order = self.config.order
        history.differences = refreshed_differences(history.differences, residual(output, probe_output), spacing, order)
        history.probe_differences = refreshed_differences(history.probe_differences, summary, spacing, order)
        if stage_input is not None:
            whole = residual(output, stage_input)
            history.whole_differences = refreshed_differences(history.whole_differences, whole, spacing, order)
        history.computed_steps.append(step)
        history.anchor = summary
        history.accumulated = torch.zeros(summary.shape[0], device=summary.device)
        history.hits_in_row = 0
        return output

    def forecast(self, history: StageHistory, differences: list, stage_state: StageState, step: int) -> StageState:
        """One more forecast in a row: add the residual extrapolated from ``differences`` to ``stage_state``."""
        history.hits_in_row += 1
        return add_residual(stage_state, extrapolate(differences, step - history.computed_steps[-1], self.coefficient))
