"""The overhead benchmark, run for real as a subprocess at a tiny setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h2cache

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def run_overhead(*extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--reps", "1", "--size", "64", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_every_method_is_timed_on_the_blocks_its_trace_says_it_ran(tmp_path):
    out = tmp_path / "overhead.json"
    result = run_overhead("--steps", str(STEPS), "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    methods = json.loads(out.read_text())["methods"]["methods"]
    assert set(methods) == set(h2cache.METHODS)
    for name, figures in methods.items():
        # the hooks time every block that really ran, no more: the same counts as h2cache's own trace
        assert [figures["double_blocks_per_call"], figures["single_blocks_per_call"]] == figures["blocks_in_trace"]
        assert figures["ms_outside_blocks_per_step"] > 0, name
    none = methods["none"]
    assert none["blocks_in_trace"] == [19 * STEPS, 38 * STEPS]
    assert none["ms_per_double_block"] > 0 and none["ms_per_single_block"] > 0
    # at least one cache skipped blocks in three steps, or the costs per block would say nothing about caching
    assert any(sum(f["blocks_in_trace"]) < 57 * STEPS for f in methods.values())


def test_a_step_count_below_one_is_one_error_and_writes_nothing(tmp_path):
    out = tmp_path / "overhead.json"
    result = run_overhead("--steps", "0", "--json", str(out))
    assert result.returncode == 2
    assert "--steps must be at least 1" in result.stderr
    assert not out.exists()
