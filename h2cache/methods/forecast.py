"""Forecasting caches (TaylorSeer, HiCache): a fixed schedule, and skipped stages filled by extrapolation.

Schedule (TaylorSeer's ``cal_type``, Shenyi-Z/TaylorSeer @ 288776d): the first ``first_enhance`` steps are
computed, then a step is computed whenever ``interval - 1`` steps have been forecast since the last one.
At a computed step each stage's residual F becomes the new zeroth term and the finite differences are refreshed,
``D[i+1] = (D_new[i] - D_old[i]) / d`` with ``d`` the step-index distance between the last two computed steps
(from the third step on, as the official code does). A forecast step at distance ``k`` from the last computed one
adds ``sum_i D[i] * basis(i, k)`` to the stage's input: ``k^i / i!`` for Taylor, scaled Hermite for HiCache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..streams import add_residual, residual, scaled
from ..trace import HIT, MISS, StageDecision
from .base import CacheMethod


def taylor_coefficient(order: int, distance: int) -> float:
    return distance**order / math.factorial(order)


def hermite(order: int, x: float) -> float:
    """Physicists' Hermite polynomial: H0 = 1, H1 = 2x, H(n+1) = 2x Hn - 2n H(n-1)."""
    previous, current = 1.0, 2.0 * x
    if order == 0:
        return previous
    for n in range(1, order):
        previous, current = current, 2.0 * x * current - 2.0 * n * previous
    return current


def hermite_coefficient(order: int, distance: int, scale: float) -> float:
    if order == 0:
        return 1.0
    return scale**order * hermite(order, scale * distance) / math.factorial(order)


def refreshed_differences(old: list, feature, spacing: int, order: int) -> list:
    """``[F, D1 F, ..., Dorder F]`` after a computation of ``feature`` ``spacing`` steps after the one that gave
    ``old``: ``D[i+1] = (D_new[i] - D_old[i]) / spacing``, as far as ``old`` reaches."""
    new = [feature]
    for index in range(min(order, len(old))):
        new.append(scaled(residual(new[index], old[index]), 1 / spacing))
    return new


def extrapolate(differences: list, distance: int, coefficient: Callable[[int, int], float]):
    """The forecast ``sum_i D[i] * coefficient(i, distance)`` of a stage residual ``distance`` steps ahead."""
    total = None
    for order, term in enumerate(differences):
        contribution = scaled(term, coefficient(order, distance))
        total = contribution if total is None else add_residual(total, contribution)
    return total


@dataclass
class ForecastState:
    computed_steps: list[int] = field(default_factory=list)
    differences: dict[str, list] = field(default_factory=dict)  # per stage: [F, D1 F, D2 F, ...]
    since_computed: int = 0


class ForecastCache(CacheMethod):
    """Shared machinery; subclasses give ``coefficient(order, distance)``."""

    def coefficient(self, order: int, distance: int) -> float:
        raise NotImplementedError

    def new_state(self) -> ForecastState:
        return ForecastState()

    def computes(self, step: int, state: ForecastState) -> bool:
        config = self.config
        return step < config.first_enhance or state.since_computed == config.interval - 1

    def step(self, run, state: ForecastState, streams):
        if self.computes(run.step_index, state):
            state.since_computed = 0
            state.computed_steps.append(run.step_index)
            double = run.double_blocks(streams, 0)
            self._refresh(state, "double", residual(double, streams), run.step_index)
            joint = run.enter_single(double)
            output = run.single_blocks(joint, 0)
            self._refresh(state, "single", residual(output, joint), run.step_index)
            return run.leave_single(output), StageDecision(MISS), StageDecision(MISS)

        state.since_computed += 1
        distance = run.step_index - state.computed_steps[-1]
        double = add_residual(streams, self._forecast(state.differences["double"], distance))
        joint = run.enter_single(double)
        joint = add_residual(joint, self._forecast(state.differences["single"], distance))
        return run.leave_single(joint), StageDecision(HIT), StageDecision(HIT)

    def _refresh(self, state: ForecastState, stage: str, feature, step: int) -> None:
        old = state.differences.get(stage, [])
        if len(state.computed_steps) >= 2 and step > self.config.first_enhance - 2:
            spacing = state.computed_steps[-1] - state.computed_steps[-2]
            state.differences[stage] = refreshed_differences(old, feature, spacing, self.config.order)
        else:
            state.differences[stage] = [feature]

    def _forecast(self, differences, distance: int):
        return extrapolate(differences, distance, self.coefficient)
