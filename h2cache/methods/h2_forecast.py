"""H2-Forecast: H2-Cache's probes decide, forecasting fills in (this project's method; ``H2ForecastConfig``).

Per step and stage, as in H2-Cache: the stage's first block runs as a probe, and its residual's PFS thumbnail is
compared with earlier ones. Unlike H2-Cache:

  - the distance is, by default, the probe's own forecast error: the probe's thumbnail is extrapolated from its
    values at the stage's computed steps exactly as the rest of the stage is, and compared (relative L1) with the
    thumbnail it really has; alternatives are TeaCache's accumulated step-to-step distance and H2-Cache's anchor;
  - a reused stage adds a forecast of its remaining blocks' residual, extrapolated from the stage's last full
    computations with ``forecast.py``'s finite differences (TaylorSeer) or scaled Hermite basis (HiCache);
  - stage 2 is judged on its own probe even when stage 1 hit (``mode="official"`` restores the forced reuse;
    ``mode="chained"`` forecasts stage 2 whole after a stage-1 hit, probe included, so such a step runs at most
    one block);
  - a probe whose distance, grown linearly from the last one measured, would still be well below the threshold is
    not run (``lazy_probes``): the stage is forecast whole, probe included, and a step can run no block at all;
  - the first ``warmup`` steps are computed; a stage is forecast at least ``min_run`` and at most ``max_run`` (shares
    of the call's steps) in a row, its probe deciding in between: early in a run the probe's error is small and
    measuring it buys nothing, and early in the trajectory it overstates what the image will show.

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
    whole_differences: list = field(default_factory=list)  # the same for the whole stage, probe included
    slope: float | None = None  # the last measured distance per step since the stage's last computation

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

    @property
    def keeps_whole_stage(self) -> bool:
        """Whether a stage can be forecast whole, probe included, so its whole residual's differences are kept."""
        return self.config.mode == "chained" or self.config.lazy_probes > 0 or self.config.min_run > 0

    def step(self, run, state: H2ForecastState, streams):
        config = self.config
        streams, stage1 = self.stage(
            state.structure, config.tau1, config.pool1, run, streams, run.double_blocks, lambda s: s.img
        )
        joint = run.enter_single(streams)
        if config.mode == "chained" and stage1.decision == HIT and not self.capped(state.detail, run.num_steps):
            # nothing of stage 2 runs, so there is no thumbnail: the next judged step compares with the last one
            joint = self.forecast(state.detail, state.detail.whole_differences, joint, run.step_index)
            return run.leave_single(joint), stage1, StageDecision(FORCED)
        forced = stage1.decision == HIT and config.mode == "official"
        joint, stage2 = self.stage(
            state.detail, config.tau2, config.pool2, run, joint, run.single_blocks, run.single_tokens, forced
        )
        return run.leave_single(joint), stage1, stage2

    def stage(self, history: StageHistory, threshold, pool, run, stage_input, blocks, tokens, forced=False):
        """One stage of one step: forecast whole without a probe, or probe, judge, then forecast or compute the rest.

        ``blocks(h, start, end=None)`` runs the stage's blocks; ``tokens`` picks the tokens its thumbnail reads.
        """
        step = run.step_index
        if not forced and self.skips_probe(history, threshold, step, run.num_steps):
            return self.forecast(history, history.whole_differences, stage_input, step), StageDecision(HIT)
        probe = blocks(stage_input, 0, 1)
        summary = summarize(tokens(probe) - tokens(stage_input), pool)
        decision = StageDecision(FORCED) if forced else self.judge(history, summary, threshold, step, run.num_steps)
        whole_from = stage_input if self.keeps_whole_stage else None
        output = self.advance(history, decision, probe, summary, step, lambda h: blocks(h, 1), whole_from)
        return output, decision

    def skips_probe(self, history: StageHistory, threshold: float, step: int, num_steps) -> bool:
        """Whether the stage is forecast whole without its probe: for the first ``min_run`` forecasts after its last
        computation, and later while the probe's distance, grown at its last measured rate, would stay below
        ``lazy_probes`` of the threshold.

        The distance of a forecast grows about linearly with the steps since the stage's last computation, so a
        probe far below the threshold mostly confirms what its rate already says: skipping it saves a block per
        stage and step, and the threshold's margin (``1 - lazy_probes``) absorbs the rate's error.
        """
        if threshold <= 0 or not history.whole_differences:
            return False
        if step < self.config.warmup or self.capped(history, num_steps):
            return False
        if history.hits_in_row < self.run_steps(self.config.min_run, num_steps):
            return True
        lazy = self.config.lazy_probes
        if not lazy or history.slope is None:
            return False
        return history.slope * (step - history.computed_steps[-1]) < lazy * threshold

    def judge(self, history: StageHistory, summary, threshold: float, step: int, num_steps=None) -> StageDecision:
        """Hit when past warm-up, within the cap, and every sample's distance is strictly below ``threshold``."""
        if not history.computed_steps:
            return StageDecision(MISS)
        distances = history.distance(summary, self.config.distance, step, self.coefficient)
        if distances is None:
            return StageDecision(MISS)
        history.slope = float(distances.max()) / (step - history.computed_steps[-1])
        hit = step >= self.config.warmup and not self.capped(history, num_steps) and bool((distances < threshold).all())
        if hit:
            history.accumulated = distances
        return StageDecision(HIT if hit else MISS, float(distances.max()))

    def capped(self, history: StageHistory, num_steps: int | None) -> bool:
        """Whether the stage has been forecast ``max_run`` (a share of the call's steps) times in a row."""
        if self.config.max_run is None or num_steps is None:
            return False
        return history.hits_in_row >= max(1, self.run_steps(self.config.max_run, num_steps))

    @staticmethod
    def run_steps(share: float | None, num_steps: int | None) -> int:
        """A run length given as a share of the call's steps, in steps (0 when either is unknown)."""
        if share is None or num_steps is None:
            return 0
        return math.floor(share * num_steps + 1e-9)

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

        With ``stage_input`` the differences of the whole stage's residual, probe included, are kept too.
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
