"""The paper's results table from per-image records, as markdown, CSV and JSON.

Input: one record (a JSON line) per generated image with at least ``config`` (label, e.g. "h2_0.15_0.22"),
``method`` ("native" marks the baseline, the unpatched pipeline; exactly one config must have it), ``prompt_id``,
``seed``, ``time_s``, ``blocks_run``, ``blocks_total``, and any of ``clip_iqa``, ``psnr``, ``ssim``, ``lpips`` (a
number, ``"inf"``, None, or ``"n/a (weights missing: …)"``).

Output, one row per config, baseline first (columns: Method | Time (s) (Speedup) | CLIP-IQA (Change %) |
CLIP-IQA change 95% CI | PSNR (dB) | SSIM | LPIPS | Blocks computed)::

    | Block Cache | 12.82 (4.35×) | 0.7681 (-0.16%) | [-0.52%, +0.21%] | 31.20 | 0.9100 | 0.0800 | 25.0% |

- Time, CLIP-IQA, PSNR, SSIM, LPIPS: means over the config's images; speedup and change are against the
  baseline's means, as in the paper. PSNR/SSIM/LPIPS already compare each image with the baseline image of the same
  prompt and seed, so the baseline's own cells are "—" (null in JSON, empty in CSV).
- The CI is a paired bootstrap over prompts (``eval.stats``) on the (prompt_id, seed) pairs both configs scored.
- PSNR of an image identical to its reference is infinite: the mean is over the finite values and the cell says
  how many were identical, e.g. "31.20 (2 identical)"; all identical gives "inf". JSON stores ``inf`` as "inf".
- A metric with no value is "n/a"; when the records give a reason ("n/a (weights missing: …)"), the markdown cell
  is "n/a [k]" and the reason is printed once, as footnote k below the table (CSV and JSON keep the full text).

CLI: ``python -m eval.tables records.jsonl --out-dir results/`` prints the table and writes table.{md,csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, ChangeInterval, paired_bootstrap_change, percent_change
from eval.weights import ALL_METRICS, FIDELITY_METRICS
from h2cache.io import write_json, write_text

BASELINE_METHOD = "native"  # the unpatched pipeline; h2cache's "none" (its own block loop) is a row like any other
REQUIRED_FIELDS = ("config", "method", "prompt_id", "seed", "time_s", "blocks_run", "blocks_total")
NOT_AVAILABLE = "n/a"
COLUMNS = (
    "Method",
    "Time (s) (Speedup)",
    "CLIP-IQA (Change %)",
    "CLIP-IQA change 95% CI",
    "PSNR (dB)",
    "SSIM",
    "LPIPS",
    "Blocks computed",
)


@dataclass(frozen=True)
class MetricSummary:
    """Mean and sample std over the finite values; ``unavailable`` holds the "n/a …" text when there are none."""

    mean: float | None
    std: float | None
    n: int
    identical: int = 0
    unavailable: str | None = None


@dataclass(frozen=True)
class ConfigRow:
    """One table row: a config's means and its comparison with the baseline."""

    config: str
    method: str
    is_baseline: bool
    n_images: int
    time_mean_s: float
    time_std_s: float
    speedup: float
    blocks_computed_pct: float
    metrics: dict[str, MetricSummary]
    clip_iqa_change_pct: float | None
    clip_iqa_change_ci: ChangeInterval | None


def json_safe(value: Any) -> Any:
    """``value`` with infinite floats as "inf"/"-inf" and NaN as None, so strict JSON readers accept it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def dumps_record(record: Mapping[str, Any]) -> str:
    """One JSON line for a per-image record (use this, not ``json.dumps``, which writes bare ``Infinity``)."""
    return json.dumps(json_safe(record), allow_nan=False)


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-image records from a JSON-lines file (blank lines ignored)."""
    records = []
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}); one record per line") from None
    return records


def metric_number(value: Any) -> float | None:
    """A record's metric value as a float (``inf`` allowed), or None when absent or "n/a …"."""
    if value is None or (isinstance(value, str) and value.startswith(NOT_AVAILABLE)):
        return None
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"metric value {value!r} is neither a number, 'inf', None nor 'n/a (…)'")
    number = float(value)
    return None if math.isnan(number) else number


def build_table(
    records: Iterable[Mapping[str, Any]],
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> list[ConfigRow]:
    """Rows of the results table, the baseline (``method == "native"``) first, then configs in order of appearance."""
    by_config = _group_by_config(records)
    baseline_configs = [name for name, rows in by_config.items() if rows[0]["method"] == BASELINE_METHOD]
    if len(baseline_configs) != 1:
        raise ValueError(
            f"need exactly one config with method {BASELINE_METHOD!r} (the uncached baseline), "
            f"found {baseline_configs or 'none'}"
        )
    baseline_name = baseline_configs[0]
    baseline_records = by_config[baseline_name]
    baseline_time = float(np.mean([record["time_s"] for record in baseline_records]))
    baseline_clip = _summarise(baseline_records, "clip_iqa")
    order = [baseline_name] + [name for name in by_config if name != baseline_name]
    table = []
    for name in order:
        config_records = by_config[name]
        is_baseline = name == baseline_name
        times = np.array([record["time_s"] for record in config_records], dtype=np.float64)
        blocks_run = sum(record["blocks_run"] for record in config_records)
        blocks_total = sum(record["blocks_total"] for record in config_records)
        if blocks_total <= 0:
            raise ValueError(f"config {name!r}: blocks_total sums to {blocks_total}; it must count the model's blocks")
        metrics = {metric: _summarise(config_records, metric) for metric in ALL_METRICS}
        change_pct, change_ci = None, None
        if not is_baseline and metrics["clip_iqa"].mean is not None and baseline_clip.mean is not None:
            change_pct = percent_change(metrics["clip_iqa"].mean, baseline_clip.mean)
            change_ci = _paired_change(config_records, baseline_records, resamples, confidence, seed)
        table.append(
            ConfigRow(
                config=name,
                method=config_records[0]["method"],
                is_baseline=is_baseline,
                n_images=len(config_records),
                time_mean_s=float(times.mean()),
                time_std_s=float(times.std(ddof=1)) if len(times) > 1 else 0.0,
                speedup=baseline_time / float(times.mean()),
                blocks_computed_pct=100.0 * blocks_run / blocks_total,
                metrics=metrics,
                clip_iqa_change_pct=change_pct,
                clip_iqa_change_ci=change_ci,
            )
        )
    return table


def format_table(rows: Sequence[ConfigRow], labels: Mapping[str, str] | None = None) -> str:
    """The table as markdown; ``labels`` maps config names to display names (e.g. {"baseline": "Baseline"})."""
    labels = labels or {}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    footnotes: dict[str, int] = {}  # "weights missing: …" -> its footnote number, in order of appearance
    for row in rows:
        cells = [labels.get(row.config, row.config)] + [_footnoted(cell, footnotes) for cell in _display_cells(row)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"[{number}] {reason}" for reason, number in footnotes.items()]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def _footnoted(cell: str, footnotes: dict[str, int]) -> str:
    """A cell "n/a (weights missing: X)" becomes "n/a [k]", and the reason is kept once, as footnote k."""
    if not cell.startswith(NOT_AVAILABLE + " (") or not cell.endswith(")"):
        return cell
    reason = cell[len(NOT_AVAILABLE) + 2 : -1]
    number = footnotes.setdefault(reason, len(footnotes) + 1)
    return f"{NOT_AVAILABLE} [{number}]"


def table_to_json(rows: Sequence[ConfigRow], resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """The table as a JSON-ready dict (missing metrics as their "n/a …" text, ``inf`` as "inf")."""
    return json_safe(
        {
            "baseline": next(row.config for row in rows if row.is_baseline),
            "bootstrap": {"resamples": resamples, "confidence": confidence, "seed": seed},
            "rows": [_row_fields(row) for row in rows],
        }
    )


def write_table(
    rows: Sequence[ConfigRow],
    out_dir: str | os.PathLike,
    stem: str = "table",
    labels: Mapping[str, str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``stem``.md, .csv and .json into ``out_dir`` atomically; returns their paths by suffix.

    Pass the same ``resamples``/``confidence``/``seed`` as to ``build_table``; they are recorded in the JSON.
    """
    out_dir = Path(out_dir)
    paths = {suffix: out_dir / f"{stem}.{suffix}" for suffix in ("md", "csv", "json")}
    write_text(paths["md"], format_table(rows, labels))
    write_text(paths["csv"], _csv_text(rows))
    write_json(paths["json"], table_to_json(rows, resamples, confidence, seed))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of a records file and write table.{md,csv,json} into ``--out-dir``."""
    parser = argparse.ArgumentParser(description="Build the results table from per-image records (JSON lines).")
    parser.add_argument("records", help="JSON-lines file, one record per image")
    parser.add_argument("--out-dir", required=True, help="where table.md, table.csv and table.json go")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    rows = build_table(load_records(args.records), resamples=args.resamples, seed=args.seed)
    print(format_table(rows), end="")
    write_table(rows, args.out_dir, resamples=args.resamples, seed=args.seed)
    return 0


def _group_by_config(records: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    by_config: dict[str, list[Mapping[str, Any]]] = {}
    for index, record in enumerate(records):
        absent = [field for field in REQUIRED_FIELDS if record.get(field) is None]
        if absent:
            raise ValueError(f"record {index} lacks {absent}; every record needs {list(REQUIRED_FIELDS)}")
        rows = by_config.setdefault(record["config"], [])
        if rows and rows[0]["method"] != record["method"]:
            raise ValueError(
                f"config {record['config']!r} mixes methods {rows[0]['method']!r} and {record['method']!r}; "
                "give each method setting its own config label"
            )
        rows.append(record)
    if not by_config:
        raise ValueError("no records: nothing to tabulate")
    return by_config


def _summarise(records: Sequence[Mapping[str, Any]], metric: str) -> MetricSummary:
    raw = [record.get(metric) for record in records]
    numbers = [number for number in map(metric_number, raw) if number is not None]
    finite = [number for number in numbers if math.isfinite(number)]
    identical = len(numbers) - len(finite)
    if not numbers:
        reasons = [value for value in raw if isinstance(value, str)]
        return MetricSummary(None, None, 0, unavailable=reasons[0] if reasons else NOT_AVAILABLE)
    if not finite:
        return MetricSummary(math.inf, None, len(numbers), identical=identical)
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return MetricSummary(float(np.mean(finite)), std, len(numbers), identical=identical)


def _paired_change(
    records: Sequence[Mapping[str, Any]],
    baseline_records: Sequence[Mapping[str, Any]],
    resamples: int,
    confidence: float,
    seed: int,
) -> ChangeInterval | None:
    def finite_scores(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, Any], float]:
        scores = {(row["prompt_id"], row["seed"]): metric_number(row.get("clip_iqa")) for row in rows}
        return {key: value for key, value in scores.items() if value is not None and math.isfinite(value)}

    method_scores, baseline_scores = finite_scores(records), finite_scores(baseline_records)
    shared = [key for key in method_scores if key in baseline_scores]
    if len(shared) < 2:
        return None
    return paired_bootstrap_change(
        [method_scores[key] for key in shared],
        [baseline_scores[key] for key in shared],
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def _display_cells(row: ConfigRow) -> list[str]:
    clip = row.metrics["clip_iqa"]
    if clip.mean is None:
        clip_cell = clip.unavailable
    elif row.is_baseline:
        clip_cell = f"{clip.mean:.4f} (-)"
    else:
        clip_cell = f"{clip.mean:.4f} ({row.clip_iqa_change_pct:+.2f}%)"
    if row.is_baseline:
        ci_cell = "—"
    elif row.clip_iqa_change_ci is None:
        ci_cell = NOT_AVAILABLE
    else:
        ci_cell = f"[{row.clip_iqa_change_ci.low_pct:+.2f}%, {row.clip_iqa_change_ci.high_pct:+.2f}%]"
    fidelity_cells = [
        _fidelity_cell(row, metric, digits) for metric, digits in (("psnr", 2), ("ssim", 4), ("lpips", 4))
    ]
    return [
        f"{row.time_mean_s:.2f} ({row.speedup:.2f}×)",
        clip_cell,
        ci_cell,
        *fidelity_cells,
        f"{row.blocks_computed_pct:.1f}%",
    ]


def _fidelity_cell(row: ConfigRow, metric: str, digits: int) -> str:
    summary = row.metrics[metric]
    if row.is_baseline:
        return "—"
    if summary.mean is None:
        return summary.unavailable
    if math.isinf(summary.mean):
        return "inf"
    text = f"{summary.mean:.{digits}f}"
    return f"{text} ({summary.identical} identical)" if summary.identical else text


def _row_fields(row: ConfigRow) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "config": row.config,
        "method": row.method,
        "n_images": row.n_images,
        "time_mean_s": row.time_mean_s,
        "time_std_s": row.time_std_s,
        "speedup": row.speedup,
        "blocks_computed_pct": row.blocks_computed_pct,
    }
    for metric in ALL_METRICS:
        summary = row.metrics[metric]
        if row.is_baseline and metric in FIDELITY_METRICS:
            fields[metric] = None
        elif summary.mean is None:
            fields[metric] = summary.unavailable
        else:
            fields[metric] = {"mean": summary.mean, "std": summary.std, "n": summary.n, "identical": summary.identical}
    ci = row.clip_iqa_change_ci
    fields["clip_iqa_change_pct"] = row.clip_iqa_change_pct
    fields["clip_iqa_change_ci"] = (
        None if ci is None else {"low_pct": ci.low_pct, "high_pct": ci.high_pct, "n_pairs": ci.n_pairs}
    )
    return fields


def _csv_text(rows: Sequence[ConfigRow]) -> str:
    header = [
        "config", "method", "n_images", "time_mean_s", "time_std_s", "speedup", "blocks_computed_pct",
        "clip_iqa_mean", "clip_iqa_std", "clip_iqa_change_pct", "clip_iqa_ci_low_pct", "clip_iqa_ci_high_pct",
        "psnr_mean", "psnr_std", "psnr_identical", "ssim_mean", "ssim_std", "lpips_mean", "lpips_std",
    ]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        fields = _row_fields(row)
        ci = fields["clip_iqa_change_ci"] or {}
        values = [fields[name] for name in header[:7]]
        values += _csv_metric(fields["clip_iqa"])
        values += [fields["clip_iqa_change_pct"], ci.get("low_pct"), ci.get("high_pct")]
        values += _csv_metric(fields["psnr"], with_identical=True)
        values += _csv_metric(fields["ssim"]) + _csv_metric(fields["lpips"])
        writer.writerow(["" if value is None else json_safe(value) for value in values])
    return buffer.getvalue()


def _csv_metric(field: Any, with_identical: bool = False) -> list[Any]:
    width = 3 if with_identical else 2
    if field is None or isinstance(field, str):
        return [field] * width
    values = [field["mean"], field["std"]]
    return values + [field["identical"]] if with_identical else values


if __name__ == "__main__":
    raise SystemExit(main())
