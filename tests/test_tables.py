"""Bootstrap, results table and figures, from synthetic per-image records written to real files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from eval.figures import plot_image_grid, plot_speed_quality
from eval.stats import paired_bootstrap_change, percent_change
from eval.tables import build_table, dumps_record, format_table, load_records, main, write_table
from h2cache.io import write_text

PROMPTS = [f"image{index:03d}" for index in range(1, 7)]
# Per-prompt deviations summing to zero, so each config's mean is exactly the number it is built from.
SPREAD = [-0.03, 0.02, -0.01, 0.015, 0.01, -0.005]


pytestmark = pytest.mark.usefixtures("offline")


# Bootstrap ----------------------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    baseline = rng.normal(0.77, 0.05, size=80)
    method = baseline * (1 - 0.002) + rng.normal(0, 0.01, size=80)
    interval = paired_bootstrap_change(method, baseline, seed=7)
    assert interval.change_pct == pytest.approx(percent_change(method.mean(), baseline.mean()))
    assert interval.low_pct < interval.change_pct < interval.high_pct
    assert interval == paired_bootstrap_change(method, baseline, seed=7)
    assert interval != paired_bootstrap_change(method, baseline, seed=8)
    assert (interval.n_pairs, interval.resamples, interval.confidence) == (80, 2000, 0.95)


def test_bootstrap_interval_narrows_with_more_prompts_and_wider_confidence_widens_it():
    rng = np.random.default_rng(1)
    baseline = rng.normal(0.77, 0.05, size=800)
    method = baseline + rng.normal(-0.002, 0.02, size=800)

    def width(interval):
        return interval.high_pct - interval.low_pct

    few, many = paired_bootstrap_change(method[:40], baseline[:40]), paired_bootstrap_change(method, baseline)
    assert width(many) < width(few) / 2  # ~ 1/sqrt(20) of the width in theory
    assert width(paired_bootstrap_change(method, baseline, confidence=0.99)) > width(many)


def test_a_constant_ratio_gives_a_degenerate_interval_at_that_ratio():
    baseline = np.linspace(0.5, 0.9, 30)
    interval = paired_bootstrap_change(baseline * 1.02, baseline)
    assert interval.low_pct == pytest.approx(2.0) and interval.high_pct == pytest.approx(2.0)


def test_bootstrap_refuses_unpaired_or_non_finite_input():
    with pytest.raises(ValueError, match="one value per prompt"):
        paired_bootstrap_change([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_change([0.1, math.nan], [0.1, 0.2])


# Tables -------------------------------------------------------------------------------------------------------------


def records_for(config, method, time_s, clip_iqa, blocks_run, blocks_total=57, **metrics):
    """One record per prompt; per-prompt values spread around the given means (which they average to exactly)."""
    rows = []
    for prompt_id, deviation in zip(PROMPTS, SPREAD, strict=True):
        row = {
            "config": config,
            "method": method,
            "prompt_id": prompt_id,
            "seed": 0,
            "time_s": time_s + 10 * deviation,
            "blocks_run": blocks_run,
            "blocks_total": blocks_total,
            "clip_iqa": None if clip_iqa is None else clip_iqa + deviation,
        }
        row.update({name: value(prompt_id) if callable(value) else value for name, value in metrics.items()})
        rows.append(row)
    return rows


@pytest.fixture
def records_file(tmp_path):
    """The paper's baseline and Block Cache rows, a config with an infinite PSNR, and one without weights."""
    records = (
        records_for("baseline", "native", 55.72, 0.7693, blocks_run=57, psnr=None, ssim=None, lpips=None)
        + records_for(
            "fbcache_t0.12", "fbcache", 12.82, 0.7681, blocks_run=14,
            psnr=lambda prompt: 30.0 + PROMPTS.index(prompt), ssim=0.91, lpips=0.08,
        )
        + records_for(
            "h2_0.15_0.22", "h2", 10.97, 0.7688, blocks_run=11,
            psnr=lambda prompt: math.inf if prompt == "image001" else 32.0, ssim=0.93, lpips=None,
        )
        + records_for(
            "teacache", "teacache", 11.16, None, blocks_run=12,
            psnr=25.0, ssim=0.8, lpips="n/a (weights missing: torch/hub/checkpoints/alexnet-owt-7be5be79.pth)",
        )
    )  # fmt: skip
    for record in records[-6:]:
        record["clip_iqa"] = "n/a (weights missing: clip/RN50.pt)"
    path = tmp_path / "records.jsonl"
    write_text(path, "".join(dumps_record(record) + "\n" for record in records))
    return path


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def table_cells(markdown):
    """{row label: [cells]} of a markdown table."""
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]  # footnotes follow the table
    rows = [line.strip("|").split(" | ") for line in lines[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_records_keep_infinite_psnr_as_strict_json(records_file):
    lines = records_file.read_text().splitlines()
    parsed = [strict_json(line) for line in lines]
    assert parsed[12]["config"] == "h2_0.15_0.22" and parsed[12]["psnr"] == "inf"
    assert load_records(records_file) == parsed


def test_table_reproduces_the_papers_speedup_and_change_arithmetic(records_file):
    rows = build_table(load_records(records_file))
    cells = table_cells(format_table(rows, labels={"baseline": "Baseline", "fbcache_t0.12": "Block Cache"}))
    assert list(cells) == ["Baseline", "Block Cache", "h2_0.15_0.22", "teacache"]
    assert cells["Baseline"][:3] == ["55.72 (1.00×)", "0.7693 (-)", "—"]
    assert cells["Baseline"][3:6] == ["—", "—", "—"]  # the baseline is the fidelity reference itself
    # 55.72 / 12.82 = 4.346 and (0.7681 - 0.7693) / 0.7693 = -0.156 %, as printed in the paper.
    assert cells["Block Cache"][:2] == ["12.82 (4.35×)", "0.7681 (-0.16%)"]
    # The paper prints -0.07% from unrounded means; from the rounded 0.7688 the change is -0.06499…%.
    assert cells["h2_0.15_0.22"][:2] == ["10.97 (5.08×)", "0.7688 (-0.06%)"]


def test_table_means_are_per_image_means_and_blocks_are_a_share_of_the_total(records_file):
    rows = {row.config: row for row in build_table(load_records(records_file))}
    block_cache = rows["fbcache_t0.12"]
    assert block_cache.metrics["psnr"].mean == pytest.approx(np.mean([30.0 + index for index in range(6)]))
    assert block_cache.blocks_computed_pct == pytest.approx(100 * 14 / 57)
    cells = table_cells(format_table(list(rows.values())))
    assert cells["fbcache_t0.12"][3:] == ["32.50", "0.9100", "0.0800", "24.6%"]
    assert cells["baseline"][-1] == "100.0%"


def test_identical_images_and_missing_metrics_are_labelled_not_averaged(records_file):
    cells = table_cells(format_table(build_table(load_records(records_file))))
    assert cells["h2_0.15_0.22"][3] == "32.00 (1 identical)"
    assert cells["h2_0.15_0.22"][5] == "n/a"
    assert cells["teacache"][1] == "n/a [1]"
    assert cells["teacache"][2] == "n/a"
    assert cells["teacache"][5] == "n/a [2]"


def test_missing_weights_read_n_a_once_with_one_footnote_per_missing_file(records_file):
    records = load_records(records_file)
    for record in records:  # no CLIP weights at all: every row, the baseline included, lacks the metric
        record["clip_iqa"] = "n/a (weights missing: clip/RN50.pt)"
    markdown = format_table(build_table(records))
    cells = table_cells(markdown)
    assert {row[1].split(" (")[0] for row in cells.values()} == {"n/a [1]"}
    assert markdown.count("clip/RN50.pt") == 1 and markdown.count("alexnet-owt-7be5be79.pth") == 1
    assert markdown.rstrip().splitlines()[-2:] == [
        "[1] weights missing: clip/RN50.pt",
        "[2] weights missing: torch/hub/checkpoints/alexnet-owt-7be5be79.pth",
    ]


def test_clip_iqa_interval_is_paired_over_prompts(records_file):
    rows = {row.config: row for row in build_table(load_records(records_file), seed=3)}
    interval = rows["fbcache_t0.12"].clip_iqa_change_ci
    # Every prompt moves by the same -0.0012, so resampled ratios stay close to the point; an unpaired bootstrap
    # would be dominated by the ±0.03 prompt spread.
    assert interval.n_pairs == 6
    assert interval.low_pct <= rows["fbcache_t0.12"].clip_iqa_change_pct <= interval.high_pct
    assert interval.high_pct - interval.low_pct < 0.1
    assert rows["teacache"].clip_iqa_change_ci is None


def test_written_csv_and_json_parse_back_to_the_table(records_file, tmp_path):
    rows = build_table(load_records(records_file), resamples=500, seed=1)
    paths = write_table(rows, tmp_path / "out", resamples=500, seed=1)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["table.csv", "table.json", "table.md"]

    table = strict_json(paths["json"].read_text())
    assert table["baseline"] == "baseline" and table["bootstrap"] == {"resamples": 500, "confidence": 0.95, "seed": 1}
    by_config = {row["config"]: row for row in table["rows"]}
    assert by_config["fbcache_t0.12"]["speedup"] == pytest.approx(55.72 / 12.82)
    assert by_config["fbcache_t0.12"]["clip_iqa_change_pct"] == pytest.approx((0.7681 - 0.7693) / 0.7693 * 100)
    assert by_config["h2_0.15_0.22"]["psnr"] == {"mean": 32.0, "std": 0.0, "n": 6, "identical": 1}
    assert by_config["baseline"]["psnr"] is None
    assert by_config["teacache"]["clip_iqa"] == "n/a (weights missing: clip/RN50.pt)"

    with open(paths["csv"], newline="", encoding="utf-8") as stream:
        csv_rows = {row["config"]: row for row in csv.DictReader(stream)}
    assert float(csv_rows["fbcache_t0.12"]["speedup"]) == pytest.approx(55.72 / 12.82)
    assert float(csv_rows["fbcache_t0.12"]["clip_iqa_ci_low_pct"]) == pytest.approx(
        by_config["fbcache_t0.12"]["clip_iqa_change_ci"]["low_pct"]
    )
    assert csv_rows["h2_0.15_0.22"]["lpips_mean"] == "n/a"
    assert csv_rows["baseline"]["psnr_mean"] == ""
    assert paths["md"].read_text() == format_table(rows)


def test_cli_prints_and_writes_the_table(records_file, tmp_path, capsys):
    assert main([str(records_file), "--out-dir", str(tmp_path / "cli"), "--resamples", "200"]) == 0
    assert "12.82 (4.35×)" in capsys.readouterr().out
    assert (tmp_path / "cli" / "table.json").is_file()


def test_bad_records_are_refused_with_the_fix_named(records_file):
    records = load_records(records_file)
    with pytest.raises(ValueError, match="exactly one config with method 'native'"):
        build_table([record for record in records if record["method"] != "native"])
    with pytest.raises(ValueError, match="exactly one config"):
        build_table(records + [dict(records[0], config="baseline_again")])
    with pytest.raises(ValueError, match=r"lacks \['blocks_total'\]"):
        build_table(records + [dict(records[0], blocks_total=None)])
    with pytest.raises(ValueError, match="mixes methods"):
        build_table(records + [dict(records[7], method="h2")])


# Figures ------------------------------------------------------------------------------------------------------------


def test_speed_quality_plot_has_one_panel_per_available_metric(records_file, tmp_path):
    rows = build_table(load_records(records_file), resamples=100)
    all_metrics = Image.open(plot_speed_quality(rows, tmp_path / "all.png"))
    without_lpips = [row for row in rows if row.config in ("baseline", "teacache")]
    psnr_and_ssim = Image.open(plot_speed_quality(without_lpips, tmp_path / "two.png", x_axis="time"))
    # 4.2 inches per panel at 120 dpi: three panels (PSNR, SSIM, LPIPS) vs two (teacache has no LPIPS).
    assert all_metrics.size[0] == pytest.approx(3 * 4.2 * 120, abs=2)
    assert psnr_and_ssim.size[0] == pytest.approx(2 * 4.2 * 120, abs=2)
    assert not list(tmp_path.glob(".*.part*"))  # written atomically, no leftovers


def test_image_grid_places_each_config_side_by_side(tmp_path):
    colours = {"baseline": (255, 0, 0), "h2_0.15_0.22": (0, 0, 255)}
    images = []
    for label, colour in colours.items():
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{label}.png")
        images.append((label, tmp_path / f"{label}.png"))
    grid = np.asarray(Image.open(plot_image_grid(images, tmp_path / "grid.png", title="image001")).convert("RGB"))
    middle_row = grid[grid.shape[0] // 2].astype(int)
    reddest, bluest = middle_row[:, 0] - middle_row[:, 2], middle_row[:, 2] - middle_row[:, 0]
    assert reddest.argmax() < grid.shape[1] / 2 < bluest.argmax()  # the order of the labels is the order shown
