"""The competing methods on the same controller: Block Cache, double first-block cache, TeaCache."""

import numpy as np
import pytest
import torch
from conftest import count_block_calls

import h2cache
from h2cache.config import TEACACHE_FLUX_COEFFICIENTS
from h2cache.methods.teacache import TeaCacheAccumulator

TRACE_KEYS = {"step", "stage1", "d1", "stage2", "d2", "double_blocks_run", "single_blocks_run"}


def diffusers_fbc_decisions(pipe, threshold, run, steps):
    """Run diffusers' own FirstBlockCacheConfig and record, per step, whether it reused the cached blocks."""
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    head = pipe.transformer.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    decisions = []
    should_compute = head._should_compute_remaining_blocks
    head._should_compute_remaining_blocks = lambda residual: decisions.append(should_compute(residual)) or decisions[-1]
    latents = run(pipe, steps=steps)
    pipe.transformer.disable_cache()
    return ["miss" if compute else "hit" for compute in decisions], latents


@pytest.mark.parametrize("threshold", [0.08, 0.12, 0.2])
def test_block_cache_makes_exactly_diffusers_first_block_cache_decisions(make_pipe, run, threshold):
    reference_pipe = make_pipe()
    expected, expected_latents = diffusers_fbc_decisions(reference_pipe, threshold, run, steps=16)
    pipe = make_pipe()
    h2cache.apply(pipe, "fbcache", threshold=threshold)
    latents = run(pipe, steps=16)
    decisions = [r["stage1"] for r in h2cache.stats(pipe)]
    assert decisions == expected and "hit" in decisions and decisions.count("miss") > 1
    torch.testing.assert_close(latents, expected_latents, rtol=1e-5, atol=1e-5)


def test_block_cache_hit_runs_only_double_block_zero(make_pipe, run):
    pipe = make_pipe()
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "fbcache", threshold=0.12)
    run(pipe, steps=12)
    trace = h2cache.stats(pipe)
    for r in trace:
        expected = (1, 0) if r["stage1"] == "hit" else (2, 4)
        assert (r["double_blocks_run"], r["single_blocks_run"]) == expected
        assert r["stage2"] == ("forced" if r["stage1"] == "hit" else "miss")
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace)
    assert counts["single"] == sum(r["single_blocks_run"] for r in trace)


def test_double_first_block_cache_is_h2_without_pfs_and_forced_hit(make_pipe, run):
    pipe = make_pipe()
    h2cache.apply(pipe, "dbfcache", tau1=0.1, tau2=0.15)
    run(pipe, steps=12)
    dbf = h2cache.stats(pipe)
    h2cache.apply(pipe, "h2", tau1=0.1, tau2=0.15, pfs=False, mode="independent")
    run(pipe, steps=12)
    assert dbf == h2cache.stats(pipe)
    assert any(r["stage1"] == "hit" and r["stage2"] in ("hit", "miss") and r["d2"] is not None for r in dbf)


def published_teacache_rule(changes, threshold, num_steps):
    """TeaCache4FLUX's rule exactly as its code reads (scalar, one call per step), for a recorded sequence."""
    rescale = np.poly1d(TEACACHE_FLUX_COEFFICIENTS)
    cnt, accumulated, decisions = 0, 0.0, []
    for change in changes:
        if cnt == 0 or cnt == num_steps - 1:
            should_calc, accumulated = True, 0
        else:
            accumulated += rescale(change)
            if accumulated < threshold:
                should_calc = False
            else:
                should_calc, accumulated = True, 0
        decisions.append(should_calc)
        cnt += 1
        if cnt == num_steps:
            cnt = 0
    return decisions


@pytest.mark.parametrize("threshold", [0.25, 0.6, 0.8])
def test_teacache_rule_matches_the_published_rule_on_a_recorded_sequence(threshold):
    recorded = [None, 0.21, 0.08, 0.05, 0.06, 0.11, 0.04, 0.03, 0.05, 0.3, 0.02, 0.06, 0.07, 0.05, 0.09, 0.12]
    expected = published_teacache_rule([c or 0 for c in recorded], threshold, len(recorded))
    accumulator = TeaCacheAccumulator(threshold, TEACACHE_FLUX_COEFFICIENTS, len(recorded))
    ours = [accumulator.compute(i, None if c is None else np.array([c]))[0] for i, c in enumerate(recorded)]
    assert ours == expected and not all(ours)


def test_teacache_threshold_caps_consecutive_reuses():
    # p(d) >= 0.18 on [0, 0.6]: at threshold 0.8 at most four steps in a row can reuse.
    accumulator = TeaCacheAccumulator(0.8, TEACACHE_FLUX_COEFFICIENTS, 100)
    decisions = [accumulator.compute(i, None if i == 0 else np.array([0.053]))[0] for i in range(100)]
    longest, streak = 0, 0
    for compute in decisions:
        streak = 0 if compute else streak + 1
        longest = max(longest, streak)
    assert longest == 4


def test_teacache_end_to_end_forces_first_and_last_step_and_skips_every_block(make_pipe, run):
    pipe = make_pipe()
    counts = count_block_calls(pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks)
    h2cache.apply(pipe, "teacache", threshold=0.6)
    run(pipe, steps=14)
    trace = h2cache.stats(pipe)
    assert trace[0]["stage1"] == trace[-1]["stage1"] == "miss"
    assert any(r["stage1"] == "hit" for r in trace)
    for r in trace:
        assert (r["double_blocks_run"], r["single_blocks_run"]) == ((0, 0) if r["stage1"] == "hit" else (2, 4))
    assert counts["double"] == sum(r["double_blocks_run"] for r in trace)
    # The scheduler told the method the step count; a bare transformer needs num_steps (last step not forced).
    assert h2cache.controller_of(pipe).method.config.num_steps is None


@pytest.mark.parametrize(
    "method, params",
    [("none", {}), ("h2", {}), ("dbfcache", {}), ("fbcache", {"threshold": 0.1}), ("teacache", {"threshold": 0.5})],
)
def test_every_method_writes_the_same_trace_keys(make_pipe, run, method, params):
    pipe = make_pipe()
    h2cache.apply(pipe, method, **params)
    run(pipe, steps=4)
    assert all(TRACE_KEYS <= set(r) for r in h2cache.stats(pipe))


@pytest.mark.parametrize(
    "method, params, field",
    [
        ("fbcache", {"threshold": -1}, "threshold"),
        ("fbcache", {"pool": 0}, "pool"),
        ("teacache", {"threshold": float("inf")}, "threshold"),
        ("teacache", {"num_steps": 0}, "num_steps"),
        ("dbfcache", {"tau2": -0.5}, "tau2"),
    ],
)
def test_method_parameters_are_validated(make_pipe, method, params, field):
    with pytest.raises(ValueError, match=field):
        h2cache.apply(make_pipe(), method, **params)
