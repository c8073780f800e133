"""The frontier benchmark, run for real as a subprocess at a tiny setting, and its table logic on its own points."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from frontier import (  # noqa: E402
    FLUX_DOUBLE,
    FLUX_SINGLE,
    PSNR_LEVELS,
    family_styles,
    format_table,
    h2cache_sweep,
    lowest_at,
    pareto,
    peer_sweep,
)

EMBEDDED = ROOT / "h2cache" / "embedded" / "tiny-flux"
HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def run_frontier(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "frontier.py"), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


FAMILIES = "h2,h2-forecast,teacache,fbc,magcache" + (",dbcache" if HAS_CACHE_DIT else "")
SMALL_RUN = (
    *("--model", str(EMBEDDED), "--steps", "28", "--prompts", "1", "--per-family", "2", "--families", FAMILIES),
    *("--repeats", "2"),
)


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory):
    if not (EMBEDDED / "transformer").is_dir():
        pytest.skip("no shipped embedded model in this checkout")
    if not HAS_CACHE_DIT and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI must measure cache-dit too: pip install -r requirements-bench.txt")
    out = tmp_path_factory.mktemp("frontier")
    result = run_frontier(out, *SMALL_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "points.json").read_text())


def test_a_rerun_continues_from_the_points_on_disk_and_measures_nothing_again(frontier_run, tmp_path):
    out, data = frontier_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    kept = data["points"][:4]  # as an interrupted run leaves it: the first points, the run they belong to
    # the fourth as if measured before a default changed: same label, other settings, so it is measured again
    stale = {**kept[3], "settings": {**kept[3]["settings"], "pool1": 1}, "mean_psnr": -1.0}
    (resumed / "points.json").write_text(json.dumps({"run": data["run"], "points": [*kept[:3], stale]}))
    result = run_frontier(resumed, *SMALL_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stdout.splitlines() if re.match(r"\[\d+/\d+\] ", line)]
    assert len(progress) == len(data["points"])
    assert [line.endswith("(measured before)") for line in progress] == [i < 3 for i in range(len(progress))]
    again = json.loads((resumed / "points.json").read_text())["points"]
    assert again[:3] == kept[:3] and [p["label"] for p in again] == [p["label"] for p in data["points"]]
    assert again[3]["settings"] == kept[3]["settings"] and again[3]["mean_psnr"] > 0


def test_benchmark_writes_every_output_atomically(frontier_run):
    out, data = frontier_run
    assert sorted(p.name for p in out.iterdir()) == ["frontier.md", "frontier.png", "points.json"]
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = data["points"]
    expected = {"H2-Cache (h2)", "H2-Forecast", "H2-Forecast (independent)", "TeaCache"}
    expected |= {"diffusers FirstBlockCache", "diffusers MagCache"}
    if HAS_CACHE_DIT:
        expected |= {"cache-dit DBCache F1B0", "cache-dit DBCache F1B0 + TaylorSeer"}
    assert {p["family"] for p in points} == expected
    assert all(len([p for p in points if p["family"] == family]) == 2 for family in expected)
    config = json.loads((EMBEDDED / "transformer" / "config.json").read_text())
    assert data["run"]["blocks"] == [config["num_layers"], config["num_single_layers"]]
    assert data["run"]["steps"] == 28 and len(data["run"]["mag_ratios"]) == 28
    for point in points:
        assert 0 < point["time_ratio"] < 3 and 0 < point["blocks"] <= 1 and 0 < point["flux_costed"] <= 1
        assert point["mean_psnr"] > 20 and 0 < point["mean_ssim"] <= 1
    # TeaCache skips whole steps: its measured and FLUX.1-costed shares are the same decisions at any proportions
    for point in (p for p in points if p["family"] == "TeaCache"):
        assert point["blocks"] == pytest.approx(point["flux_costed"])
    # a probe-based cache's hit costs 1 of the model's double (single) blocks, 1 of 19 (38) once FLUX.1-costed: the
    # same share on a model with FLUX.1's block counts, a smaller one on a shallower model
    h2_points = [p for p in points if p["family"] == "H2-Cache (h2)"]
    if data["run"]["blocks"] == [FLUX_DOUBLE, FLUX_SINGLE]:
        assert all(p["flux_costed"] == pytest.approx(p["blocks"]) for p in h2_points)
    else:
        assert all(p["flux_costed"] < p["blocks"] for p in h2_points)


def test_each_call_counts_its_fastest_of_the_repeated_timings(frontier_run):
    _, data = frontier_run
    assert data["run"]["repeats"] == 2
    for point in data["points"]:
        (prompt,) = point["per_prompt"]
        assert len(prompt["transformer_s_runs"]) == len(prompt["uncached_transformer_s_runs"]) == 2
        assert prompt["transformer_s"] == min(prompt["transformer_s_runs"])
        assert prompt["uncached_transformer_s"] == min(prompt["uncached_transformer_s_runs"])
        assert point["time_ratio"] == pytest.approx(prompt["transformer_s"] / prompt["uncached_transformer_s"])


def test_block_counts_agree_with_the_h2cache_trace(frontier_run):
    """to_q calls are what the hook-based peers are counted by; on h2cache's own methods they must equal the trace."""
    _, data = frontier_run
    for point in (p for p in data["points"] if p["kind"] == "h2cache"):
        assert point["blocks"] == pytest.approx(point["per_prompt"][0]["trace_blocks"])


def test_table_takes_the_lowest_time_ratio_at_each_level_from_recorded_points(frontier_run):
    out, data = frontier_run
    points = data["points"]
    table = format_table(points)
    assert (out / "frontier.md").read_text().endswith(table)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.split("\n\n")[1].splitlines()[2:]}
    for family in {p["family"] for p in points}:
        members = [p for p in points if p["family"] == family]
        cells = rows[family].strip("|").split(" | ")[1:]
        for level, cell in zip(PSNR_LEVELS, cells, strict=True):
            passing = [p["time_ratio"] for p in members if p["mean_psnr"] >= level]
            best = lowest_at(members, level)
            if passing:
                assert best["time_ratio"] == min(passing) and cell.startswith(f"{min(passing):.3f}")
            else:
                assert best is None and cell.strip() == "—"
    for family in {p["family"] for p in points}:
        members = [p for p in points if p["family"] == family]
        front = pareto(members)
        for point in members:  # every point is on the front or beaten on both axes by a front point
            assert point in front or any(
                f["time_ratio"] <= point["time_ratio"] and f["mean_psnr"] >= point["mean_psnr"] for f in front
            )
        assert [f["time_ratio"] for f in front] == sorted(f["time_ratio"] for f in front)


def test_bad_family_is_one_error_and_writes_nothing(tmp_path):
    result = run_frontier(tmp_path / "out", "--families", "nosuchcache")
    assert result.returncode == 2 and "selects no configuration" in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_timed_pair_is_one_error_and_writes_nothing(tmp_path):
    result = run_frontier(tmp_path / "out", "--repeats", "0")
    assert result.returncode == 2 and "--repeats must be >= 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_every_family_of_the_sweep_is_drawn_in_a_colour_of_its_own():
    """The plot had 13 families on tab10's 10 colours, so two pairs of families looked alike."""
    kinds = {config.family: config.kind for config in h2cache_sweep(50) + peer_sweep(50)}
    styles = family_styles(kinds)
    assert len(kinds) > 10
    assert len({style["color"] for style in styles.values()}) == len(kinds)
    assert {styles[family]["linestyle"] for family, kind in kinds.items() if kind != "h2cache"} == {"--"}
