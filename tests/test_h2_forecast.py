"""H2-Forecast: H2-Cache's probes decide, a forecast of the stage residual replaces it on a hit."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPT, count_block_calls
from nunchaku_standins import install_nunchaku_rotary_module, nunchaku_v1_standin, nunchaku_v2_standin
from test_backends import SPEC, traced_run, with_transformer

import h2cache
from h2cache.config import H2ForecastConfig
from h2cache.methods.h2_forecast import H2Forecast, StageHistory
from h2cache.trace import FORCED, HIT, MISS, StageDecision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ablation import PAPER_RULE  # noqa: E402  (the settings the ablation starts from, tested to be H2-Cache's rule)

HITTING = {"tau1": 2.0, "tau2": 2.0, "max_run": 0.2}  # 3 of 16 steps, 2 of 10
EVERY_PROBE = {**HITTING, "lazy_probes": 0, "min_run": 0}  # every forecast stage runs its probe: one block


def test_zero_thresholds_are_bit_identical_to_no_cache(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "none")
    expected = run(pipe, steps=10)
    h2cache.apply(pipe, "h2-forecast", tau1=0, tau2=0)
    latents = run(pipe, steps=10)
    assert torch.equal(latents, expected)
    assert all(r["stage1"] == r["stage2"] == MISS for r in h2cache.stats(pipe))


def test_trace_has_h2_cache_keys_and_counts_what_ran(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2")
    run(pipe, steps=4)
    h2_keys = {key for record in h2cache.stats(pipe) for key in record}
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    # independent mode judges both probes at every step (the chained default is counted in its own test)
    h2cache.apply(pipe, "h2-forecast", mode="independent", warmup=2, **EVERY_PROBE)
    run(pipe, steps=16)
    trace = h2cache.stats(pipe)
    assert all(set(record) == h2_keys for record in trace)
    assert {r["stage1"] for r in trace} == {r["stage2"] for r in trace} == {HIT, MISS}
    for r in trace:
        assert r["double_blocks_run"] == (1 if r["stage1"] == HIT else 2)
        assert r["single_blocks_run"] == (1 if r["stage2"] == HIT else 4)
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace)
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace)
    # warm-up and the cap: the first two steps are computed, and no stage is forecast four times in a row
    assert [r["stage1"] for r in trace[:2]] == [MISS, MISS]
    for stage in ("stage1", "stage2"):
        decisions = "".join("h" if r[stage] == HIT else "m" for r in trace)
        assert "hhhh" not in decisions and "hhh" in decisions


def recorded_stage_residuals(make_pipe, run, steps=6):
    """The double stage's residual after block 0, per step, from a real uncached run: [B, N, C] image tensors."""
    pipe = make_pipe()
    blocks = pipe.transformer.transformer_blocks
    inputs, residuals = [], []
    blocks[1].register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["hidden_states"]), with_kwargs=True
    )
    blocks[-1].register_forward_hook(
        lambda module, args, kwargs, out: residuals.append(out[1] - inputs[-1]), with_kwargs=True
    )
    run(pipe, steps=steps, prompt=[PROMPT, "a large green square at the top"])
    return residuals


def drive(method, history, residuals, decisions):
    """Feed ``advance`` the recorded residuals as the stage's full computations; returns what it added per step."""
    added = []
    for step, (recorded, decision) in enumerate(zip(residuals, decisions, strict=True)):
        probe = torch.zeros_like(recorded)
        summary = torch.zeros(recorded.shape[0], 1)
        output = method.advance(history, StageDecision(decision), probe, summary, step, lambda h, r=recorded: h + r)
        added.append(output - probe)
    return added


@pytest.mark.parametrize("basis", ["taylor", "hermite"])
def test_forecast_equals_the_formula_on_recorded_residuals(make_pipe, run, basis):
    residuals = recorded_stage_residuals(make_pipe, run)
    method = H2Forecast(H2ForecastConfig(order=2, basis=basis, scale=0.5))
    added = drive(method, StageHistory(), residuals, [MISS, MISS, HIT, MISS, HIT, HIT])
    f0, f1, f3 = residuals[0], residuals[1], residuals[3]
    first_old = (f1 - f0) / 1
    first = (f3 - f1) / 2  # computed steps 1 and 3
    second = (first - first_old) / 2
    if basis == "taylor":
        basis_terms = lambda k: (k, k**2 / 2)  # noqa: E731
    else:  # sigma * H1(sigma k) and sigma^2 * H2(sigma k) / 2, H1 = 2x, H2 = 4x^2 - 2
        basis_terms = lambda k: (0.5 * 2 * 0.5 * k, 0.25 * (4 * (0.5 * k) ** 2 - 2) / 2)  # noqa: E731
    torch.testing.assert_close(added[2], f1 + first_old * basis_terms(1)[0])  # only one difference exists at step 2
    for step in (4, 5):
        c1, c2 = basis_terms(step - 3)
        torch.testing.assert_close(added[step], f3 + first * c1 + second * c2)
    for step in (0, 1, 3):
        assert torch.equal(added[step], residuals[step])


def test_batch_samples_keep_separate_histories(make_pipe, run):
    residuals = recorded_stage_residuals(make_pipe, run)
    decisions = [MISS, MISS, HIT, MISS, HIT, HIT]
    method = H2Forecast(H2ForecastConfig(order=2))
    batched = drive(method, StageHistory(), residuals, decisions)
    for sample in range(2):
        alone = drive(method, StageHistory(), [r[sample : sample + 1] for r in residuals], decisions)
        for together, single in zip(batched, alone, strict=True):
            torch.testing.assert_close(together[sample : sample + 1], single)
    # distances accumulate per sample: each is the sum of that sample's own step-to-step distances
    method = H2Forecast(H2ForecastConfig(distance="accumulated"))
    history = StageHistory(differences=[torch.zeros(2, 1)], computed_steps=[0])
    history.previous, history.accumulated = torch.ones(2, 4), torch.zeros(2)
    for step, scale in enumerate((1.5, 2.0), start=2):
        summary = torch.stack([torch.full((4,), scale), torch.ones(4)])
        method.judge(history, summary, threshold=10.0, step=step)
        history.previous = summary
    torch.testing.assert_close(history.accumulated, torch.tensor([0.5 + 1 / 3, 0.0]))


def test_cfg_branches_keep_separate_histories(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2-forecast", **HITTING)
    run(pipe, negative_prompt=PROMPT, true_cfg_scale=2.0, steps=10)
    trace = h2cache.stats(pipe)
    cond = [(r["step"], r["stage1"], r["d1"], r["stage2"], r["d2"]) for r in trace if r["branch"] == "cond"]
    uncond = [(r["step"], r["stage1"], r["d1"], r["stage2"], r["d2"]) for r in trace if r["branch"] == "uncond"]
    # identical branches, identical histories: a shared state would see every step twice and decide otherwise
    assert cond == uncond and len(cond) == 10 and any(d[1] == HIT for d in cond)


@pytest.mark.parametrize("mode, stage2_forecast", [("independent", HIT), ("chained", FORCED)])
def test_nunchaku_standins_make_the_diffusers_decisions(make_pipe, run, monkeypatch, mode, stage2_forecast):
    install_nunchaku_rotary_module(monkeypatch)
    pipe = make_pipe(SPEC)
    expected, expected_trace = traced_run(pipe, run, "h2-forecast", mode=mode, **HITTING)
    latents, trace = traced_run(
        with_transformer(pipe, nunchaku_v2_standin(pipe.transformer)), run, "h2-forecast", mode=mode, **HITTING
    )
    assert trace == expected_trace and any(r["stage1"] == HIT for r in trace)
    assert torch.equal(latents, expected)
    bf16 = make_pipe(SPEC).to(torch.bfloat16)
    expected, expected_trace = traced_run(bf16, run, "h2-forecast", mode=mode, **HITTING)
    latents, trace = traced_run(
        with_transformer(bf16, nunchaku_v1_standin(bf16.transformer)), run, "h2-forecast", mode=mode, **HITTING
    )
    assert trace == expected_trace
    assert any(r["stage2"] == stage2_forecast for r in trace)
    assert torch.equal(latents, expected)


def test_official_mode_forecasts_stage_two_whenever_stage_one_hits(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2-forecast", mode="official", **HITTING)
    run(pipe, steps=12)
    trace = h2cache.stats(pipe)
    assert any(r["stage1"] == HIT for r in trace)
    assert all(r["stage2"] == "forced" and r["d2"] is None for r in trace if r["stage1"] == HIT)


def test_chained_mode_runs_only_the_structure_probe_when_both_stages_are_forecast(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2-forecast", mode="independent", **EVERY_PROBE)
    run(pipe, steps=16)
    independent_blocks = sum(r["double_blocks_run"] + r["single_blocks_run"] for r in h2cache.stats(pipe))
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "h2-forecast", mode="chained", **EVERY_PROBE)
    run(pipe, steps=16)
    trace = h2cache.stats(pipe)
    chained = [r for r in trace if r["stage2"] == FORCED]
    assert chained and all(r["stage1"] == HIT and r["single_blocks_run"] == 0 and r["d2"] is None for r in chained)
    assert all(r["stage2"] != FORCED for r in trace if r["stage1"] != HIT)
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace)
    assert sum(r["double_blocks_run"] + r["single_blocks_run"] for r in trace) < independent_blocks
    # the cap holds for stage 2 too: however it was forecast, never four times in a row
    forecasts = "".join("f" if r["stage2"] in (HIT, FORCED) else "c" for r in trace)
    assert "ffff" not in forecasts


def test_chained_mode_keeps_the_whole_stage_residual_beside_the_rest(make_pipe, run):
    residuals = recorded_stage_residuals(make_pipe, run)
    method = H2Forecast(H2ForecastConfig(order=1, mode="chained"))
    history = StageHistory()
    probe_residual = [0.5 * r for r in residuals]  # what the stage's first block added, the rest adds the recording
    for step in (0, 2):
        stage_input = torch.zeros_like(residuals[step])
        probe_output = stage_input + probe_residual[step]
        method.advance(
            history,
            StageDecision(MISS),
            probe_output,
            torch.zeros(2, 1),
            step,
            lambda h, r=residuals[step]: h + r,
            stage_input=stage_input,
        )
    whole = [probe_residual[s] + residuals[s] for s in (0, 2)]
    torch.testing.assert_close(history.whole_differences[0], whole[1])
    torch.testing.assert_close(history.whole_differences[1], (whole[1] - whole[0]) / 2)
    torch.testing.assert_close(history.differences[0], residuals[2])


@pytest.mark.parametrize(
    "params, field",
    [
        ({"tau1": -0.1}, "tau1"),
        ({"tau2": float("nan")}, "tau2"),
        ({"order": -1}, "order"),
        ({"basis": "chebyshev"}, "basis"),
        ({"max_run": -1}, "max_run"),
        ({"warmup": 0}, "warmup"),
        ({"distance": "euclid"}, "distance"),
        ({"mode": "paper"}, "mode"),
        ({"pool1": 0}, "pool1"),
        ({"lazy_probes": 1.5}, "lazy_probes"),
        ({"lazy_probes": -0.25}, "lazy_probes"),
        ({"lazy_probes": "0.5"}, "lazy_probes"),
        ({"min_run": 1.0, "max_run": None}, "min_run"),
        ({"min_run": -0.1}, "min_run"),
    ],
)
def test_parameters_are_validated(make_pipe, params, field):
    with pytest.raises(ValueError, match=field):
        h2cache.apply(make_pipe(), "h2-forecast", **params)


def test_anchor_distance_without_forecast_cap_or_warmup_is_exactly_h2(make_pipe, run):
    """The settings benchmarks/ablation.py starts from: H2-Cache's rule, so each ablation changes one thing."""
    pipe = make_pipe()
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15)
    expected = run(pipe, steps=14)
    expected_trace = h2cache.stats(pipe)
    h2cache.apply(pipe, "h2-forecast", tau1=0.1, tau2=0.15, **PAPER_RULE)
    latents = run(pipe, steps=14)
    assert h2cache.stats(pipe) == expected_trace and any(r["stage1"] == HIT for r in expected_trace)
    assert torch.equal(latents, expected)


@pytest.mark.parametrize("mode", ["chained", "independent"])
def test_lazy_probes_forecast_a_stage_whole_without_running_a_block(make_pipe, run, mode):
    pipe = make_pipe()
    h2cache.apply(pipe, "h2-forecast", mode=mode, **EVERY_PROBE)
    run(pipe, steps=16)
    every_probe = h2cache.stats(pipe)
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "h2-forecast", mode=mode, **HITTING)
    run(pipe, steps=16)
    trace = h2cache.stats(pipe)
    unprobed = [r for r in trace if r["stage1"] == HIT and r["d1"] is None]
    assert unprobed and all(r["double_blocks_run"] == 0 for r in unprobed)
    if mode == "independent":
        assert any(r["stage2"] == HIT and r["d2"] is None and r["single_blocks_run"] == 0 for r in trace)
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace)
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace)
    blocks = lambda records: sum(r["double_blocks_run"] + r["single_blocks_run"] for r in records)  # noqa: E731
    assert blocks(trace) < blocks(every_probe)
    # a skipped probe still counts as a forecast: the cap holds
    assert "hhhh" not in "".join("h" if r["stage1"] == HIT else "m" for r in trace)


def test_a_probe_is_skipped_while_its_distance_grown_linearly_stays_below_the_share_of_the_threshold():
    method = H2Forecast(H2ForecastConfig(distance="anchor", lazy_probes=0.75, max_run=None, min_run=0))
    history = StageHistory(anchor=torch.ones(1, 4), previous=torch.ones(1, 4), computed_steps=[3])
    history.whole_differences = [torch.zeros(1, 4)]
    method.judge(history, torch.full((1, 4), 1.2), threshold=0.5, step=7)
    assert history.slope == pytest.approx(0.2 / 4)  # the measured distance per step since the computation
    # 0.05 per step against 0.75 of 0.3: skipped while 0.05 k < 0.225, i.e. up to 4 steps after the computation
    assert [method.skips_probe(history, 0.3, step, num_steps=50) for step in (4, 7, 8)] == [True, True, False]
    assert not method.skips_probe(history, 0.3, 0, num_steps=50)  # warm-up
    history.hits_in_row = 12
    assert not H2Forecast(H2ForecastConfig(lazy_probes=0.75)).skips_probe(history, 0.3, 4, num_steps=50)  # the cap
    history.hits_in_row = 0
    assert not H2Forecast(H2ForecastConfig(lazy_probes=0, min_run=0)).skips_probe(history, 0.3, 4, num_steps=50)
    history.whole_differences = []
    assert not method.skips_probe(history, 0.3, 4, num_steps=50)  # nothing to forecast the whole stage from


def test_a_stage_is_forecast_without_its_probe_for_min_run_and_judged_until_max_run(make_pipe, run):
    # 20 steps: after each computation 3 forecasts without a probe (0.16), then the probe decides, up to 4 (0.2)
    pipe = make_pipe()
    h2cache.apply(pipe, "h2-forecast", tau1=2.0, tau2=2.0, min_run=0.16, max_run=0.2, lazy_probes=0)
    run(pipe, steps=20)
    trace = h2cache.stats(pipe)
    runs = []
    assert [r["stage1"] for r in trace[:2]] == [MISS, HIT]  # one warm-up step (the default), then forecasts
    for record in trace:
        if record["stage1"] == MISS:
            runs.append([])
        else:
            runs[-1].append(record["d1"] is not None)
    assert len(runs) >= 3 and all(len(r) <= 4 for r in runs)
    assert all(r[:3] == [False] * min(3, len(r)) and all(r[3:]) for r in runs)  # unprobed first, probed after
    assert all(r["double_blocks_run"] == 0 for r in trace if r["stage1"] == HIT and r["d1"] is None)
    # a zero threshold forecasts nothing, floor or not
    h2cache.apply(pipe, "h2-forecast", tau1=0, tau2=0, min_run=0.16)
    run(pipe, steps=20)
    assert all(r["stage1"] == r["stage2"] == MISS for r in h2cache.stats(pipe))


def test_an_unprobed_stage_adds_its_whole_residual_forecast():
    method = H2Forecast(H2ForecastConfig(order=1, basis="taylor", lazy_probes=1.0, max_run=None))
    whole, change = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    history = StageHistory(computed_steps=[6], slope=0.001, whole_differences=[whole, change])
    history.differences = [torch.full((2, 5, 3), 99.0)]  # the rest-of-stage residual must not be used

    def blocks(*args):
        raise AssertionError("a skipped probe runs no block")

    stage_input = torch.randn(2, 5, 3)
    run = SimpleNamespace(step_index=9, num_steps=20)
    output, decision = method.stage(history, 0.3, 64, run, stage_input, blocks, lambda s: s)
    assert decision == StageDecision(HIT)
    torch.testing.assert_close(output, stage_input + whole + 3 * change)
    assert history.hits_in_row == 1
