"""Threshold calibration: the cheapest cache configuration that keeps a fidelity target on a model's own prompts.

The paper leaves the choice of (tau1, tau2) open: thresholds depend on the model, its quantisation, the step count
and the resolution. This searches a grid on a few prompts: every configuration's images are compared (PSNR, uint8
pixels) with the uncached images of the same prompts and seeds, and the configuration that computes the fewest
blocks while its *mean* PSNR stays at or above the target wins (ties: higher PSNR).

    python -m eval.calibrate --model tiny --prompts grammar:20 --tau1 0.05,0.1,0.2 --tau2 0.1,0.2,0.3 \\
        --target-psnr 30 --out results/calibration

writes ``calibration.json`` (every configuration's blocks fraction and PSNR), ``calibration.md``, and
``distances.png`` (the chosen configuration's probe distances on the first prompt).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

THRESHOLD_NAMES = {
    "h2": ("tau1", "tau2"),
    "h2-forecast": ("tau1", "tau2"),
    "dbfcache": ("tau1", "tau2"),
    "fbcache": ("threshold",),
    "teacache": ("threshold",),
}
DEFAULT_GRIDS = {
    "tau1": "0.05,0.1,0.15,0.2,0.3",
    "tau2": "0.1,0.15,0.22,0.3,0.4",
    "threshold": "0.05,0.08,0.12,0.2,0.3",
}
DEFAULT_TARGET_PSNR = 30.0
DEFAULT_SEED = 1000


@dataclass
class Candidate:
    params: dict
    blocks_fraction: float  # blocks run / blocks of the uncached run, over all prompts
    mean_psnr: float
    min_psnr: float
    meets_target: bool


def generate_all(pipe, prompts, seed: int, call: dict) -> tuple[list[np.ndarray], list[list[dict]]]:
    import h2cache
    from h2cache.generate import timed_call

    images, traces = [], []
    for prompt in prompts:
        image, _ = timed_call(pipe, prompt, seed, call)
        images.append(np.array(image))
        traces.append(h2cache.stats(pipe))
    return images, traces


def parse_grid(method: str, values: dict[str, str]) -> dict[str, list[float]]:
    """The grid of ``method``'s thresholds from comma-separated text per name; ``ValueError`` names a bad entry."""
    grid = {}
    for name in THRESHOLD_NAMES[method]:
        try:
            grid[name] = [float(v) for v in values[name].split(",")]
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated numbers, got {values[name]!r}") from None
    return grid


def calibrate(pipe, prompts, method: str, grid: dict, target_psnr: float, seed: int = 0, call: dict | None = None):
    """Evaluate every grid point; returns (chosen Candidate or None, all candidates, traces of the chosen one)."""
    import h2cache
    from eval.metrics.fidelity import psnr
    from h2cache.generate import call_arguments

    call = call or call_arguments(pipe)
    h2cache.apply(pipe, "none")
    references, _ = generate_all(pipe, prompts, seed, call)
    names = list(grid)
    candidates, traces_of = [], {}
    for values in itertools.product(*(grid[name] for name in names)):
        params = dict(zip(names, values, strict=True))
        h2cache.apply(pipe, method, **params)
        images, traces = generate_all(pipe, prompts, seed, call)
        run = sum(r["double_blocks_run"] + r["single_blocks_run"] for trace in traces for r in trace)
        total = sum(r["double_blocks_total"] + r["single_blocks_total"] for trace in traces for r in trace)
        scores = [psnr(image, reference) for image, reference in zip(images, references, strict=True)]
        mean = float(np.mean(scores))  # an identical image scores inf, and so does a mean containing it
        candidates.append(Candidate(params, run / total, mean, float(np.min(scores)), mean >= target_psnr))
        traces_of[json.dumps(params)] = traces
    h2cache.remove(pipe)
    passing = [c for c in candidates if c.meets_target]
    chosen = min(passing, key=lambda c: (c.blocks_fraction, -c.mean_psnr)) if passing else None
    return chosen, candidates, traces_of[json.dumps(chosen.params)] if chosen else None


def format_candidates(candidates, chosen, target_psnr: float) -> str:
    lines = ["| config | blocks computed | mean PSNR (dB) | min PSNR (dB) |", "|---|---|---|---|"]
    for c in sorted(candidates, key=lambda c: c.blocks_fraction):
        mark = " **chosen**" if c is chosen else ""
        label = ", ".join(f"{k}={v}" for k, v in c.params.items())
        lines.append(f"| {label}{mark} | {100 * c.blocks_fraction:.1f}% | {c.mean_psnr:.2f} | {c.min_psnr:.2f} |")
    verdict = "none meets it" if chosen is None else "chosen: the fewest blocks among those that meet it"
    return "\n".join(lines) + f"\n\nTarget: mean PSNR >= {target_psnr} dB; {verdict}.\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="as run.py's --model")
    parser.add_argument("--prompts", default="grammar:20", help="as eval.runner's --prompts")
    parser.add_argument("--limit", type=int, help="first N prompts only")
    parser.add_argument("--method", default="h2", choices=sorted(THRESHOLD_NAMES))
    parser.add_argument("--tau1", default=DEFAULT_GRIDS["tau1"], help="comma-separated grid (h2*, dbfcache)")
    parser.add_argument("--tau2", default=DEFAULT_GRIDS["tau2"], help="comma-separated grid (h2*, dbfcache)")
    parser.add_argument("--threshold", default=DEFAULT_GRIDS["threshold"], help="grid for fbcache / teacache")
    parser.add_argument("--target-psnr", type=float, default=DEFAULT_TARGET_PSNR, help="mean PSNR to keep, dB")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of every prompt")
    parser.add_argument("--out", type=Path, required=True, help="folder for calibration.{json,md}, distances.png")
    args = parser.parse_args(argv)

    from eval.runner import load_prompts
    from eval.trace_plot import plot_probe_distances
    from h2cache.generate import call_arguments
    from h2cache.io import write_json, write_text
    from h2cache.models import SetupError, load_planned, plan_model

    try:
        grid = parse_grid(args.method, vars(args))
        prompts = [p for _, p in load_prompts(args.prompts, args.limit)]
        pipe = load_planned(plan_model(args.model))
    except (ValueError, SetupError) as error:
        print(f"eval.calibrate: error: {error}", file=sys.stderr)
        return 2
    call = call_arguments(pipe, steps=args.steps)
    chosen, candidates, traces = calibrate(pipe, prompts, args.method, grid, args.target_psnr, args.seed, call)
    table = format_candidates(candidates, chosen, args.target_psnr)
    write_json(
        args.out / "calibration.json",
        {
            "model": args.model,
            "method": args.method,
            "prompts": len(prompts),
            "seed": args.seed,
            "steps": call["num_inference_steps"],
            "target_psnr": args.target_psnr,
            "chosen": asdict(chosen) if chosen else None,
            "candidates": [asdict(c) for c in candidates],
        },
    )
    write_text(args.out / "calibration.md", table)
    if chosen and "tau1" in chosen.params:
        from h2cache import METHODS

        plot_probe_distances(traces[0], args.out / "distances.png", METHODS[args.method][0](**chosen.params))
    print(table, end="")
    return 0 if chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
