"""TaylorSeer and HiCache (stage level): schedule, bases and extrapolation."""

import pytest
import torch
from conftest import count_block_calls

import h2cache
from h2cache.config import TaylorSeerConfig
from h2cache.methods.forecast import ForecastState, hermite_coefficient
from h2cache.methods.taylorseer import TaylorSeer

# TaylorSeer's full steps at 50 steps per interval N (the official schedule; shared/specs table).
OFFICIAL_FULL_STEPS = {
    3: [0, 1, 2] + list(range(5, 50, 3)),
    6: [0, 1, 2, 8, 14, 20, 26, 32, 38, 44],
    7: [0, 1, 2, 9, 16, 23, 30, 37, 44],
    8: [0, 1, 2, 10, 18, 26, 34, 42],
}


@pytest.mark.parametrize("interval", sorted(OFFICIAL_FULL_STEPS))
def test_schedule_matches_the_official_code(interval):
    method, state, full = TaylorSeer(TaylorSeerConfig(interval=interval)), ForecastState(), []
    for step in range(50):
        if method.computes(step, state):
            full.append(step)
            state.since_computed = 0
            state.computed_steps.append(step)
        else:
            state.since_computed += 1
    assert full == OFFICIAL_FULL_STEPS[interval]


@pytest.mark.parametrize("distance, c1, c2", [(1, 0.5, -0.125), (3, 1.5, 0.875), (6, 3.0, 4.25)])
def test_hermite_coefficients_at_sigma_one_half(distance, c1, c2):
    assert hermite_coefficient(1, distance, 0.5) == pytest.approx(c1)
    assert hermite_coefficient(2, distance, 0.5) == pytest.approx(c2)


def test_order_one_taylor_forecast_is_exact_on_a_linear_trajectory():
    method, state = TaylorSeer(TaylorSeerConfig(interval=6, order=1)), ForecastState()
    a, b = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    for step in (0, 1, 2, 8):
        state.computed_steps.append(step)
        method._refresh(state, "single", a + b * step, step)
    for step in range(9, 14):
        torch.testing.assert_close(method._forecast(state.differences["single"], step - 8), a + b * step)


@pytest.mark.parametrize("method, params", [("taylorseer", {}), ("taylorseer", {"order": 2}), ("hicache", {})])
def test_forecast_steps_run_no_block_and_stay_close_to_the_baseline(make_pipe, run, method, params):
    pipe = make_pipe()
    reference = run(pipe, steps=28)
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, method, **params)
    latents = run(pipe, steps=28)
    trace = h2cache.stats(pipe)
    computed = [r["step"] for r in trace if r["stage1"] == "miss"]
    assert computed == ([0, 1, 2, 8, 14, 20, 26] if method == "taylorseer" else [0, 1, 2, 9, 16, 23])
    assert counts["double"] == 2 * len(computed) and counts["single"] == 4 * len(computed)
    assert 0 < (latents - reference).norm() / reference.norm() < 0.05


@pytest.mark.parametrize("params", [{"interval": 0}, {"order": -1}, {"first_enhance": 0}, {"scale": -0.5}])
def test_forecast_parameters_are_validated(make_pipe, params):
    with pytest.raises(ValueError, match=next(iter(params))):
        h2cache.apply(make_pipe(), "hicache", **params)
