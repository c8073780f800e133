"""Why the paper's rule loses on this model: H2-Cache's rule, then one of its choices changed at a time.

    python benchmarks/ablation.py --steps 28,50,100 --out results/ablation

``h2-forecast`` with ``distance="anchor", order=0, max_run=None, warmup=1, mode="official", lazy_probes=0,
min_run=0`` *is* H2-Cache's rule (tests/test_h2_forecast.py checks it decides and computes exactly as ``h2``), so each
row below changes one thing:

  - stale residuals: a hit adds a forecast (order 1 / 2) instead of the residual of the last miss;
  - long hit runs: at most 8% of the steps (4 of 50) hit in a row per stage;
  - forced stage-2 reuse: stage 2 judged on its own probe after a stage-1 hit;
  - the reference since the last miss: the distance summed step to step instead (TeaCache's accumulation);
  - the step count: every row at each ``--steps`` with the same thresholds.

Same prompts, seeds, timing and counting as ``frontier.py``; writes ``ablation.json`` and ``ablation.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from frontier import BenchConfig, BlockCounter, Installer, load_model, measure, run_once  # noqa: E402

PAPER_RULE = {
    "distance": "anchor",
    "order": 0,
    "max_run": None,
    "warmup": 1,
    "mode": "official",
    "lazy_probes": 0,
    "min_run": 0,
}
TAUS = {"tau1": 0.15, "tau2": 0.22}
ROWS = [
    ("H2-Cache's rule (h2, 0.15 / 0.22)", {}),
    ("forecast order 1 instead of stale reuse", {"order": 1}),
    ("forecast order 2 (Hermite) instead of stale reuse", {"order": 2, "basis": "hermite"}),
    ("at most 8% of the steps forecast in a row", {"max_run": 0.08}),
    ("stage 2 judged on its own (no forced reuse)", {"mode": "independent"}),
    ("distance summed step to step, not to the last miss", {"distance": "accumulated"}),
    ("all four", {"order": 2, "basis": "hermite", "max_run": 0.08, "mode": "independent", "distance": "accumulated"}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, an embedded model folder, or as run.py's --model")
    parser.add_argument("--steps", default="28,50,100", help="comma-separated step counts")
    parser.add_argument("--prompts", type=int, default=6, help="grammar prompts")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--out", type=Path, required=True, help="folder for ablation.json and ablation.md")
    args = parser.parse_args(argv)

    import torch

    from eval.runner import load_prompts
    from h2cache.generate import call_arguments
    from h2cache.io import write_json, write_text

    torch.set_num_threads(1)
    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for _, p in load_prompts(f"grammar:{args.prompts}")]
    counter = BlockCounter(pipe.transformer)
    results, lines = [], []
    for steps in (int(s) for s in args.steps.split(",")):
        call = call_arguments(pipe, steps=steps)
        references = [np.array(run_once(pipe, p, args.seed + i, call)[0]) for i, p in enumerate(prompts)]
        counter.take()
        installer = Installer(pipe, call, prompts[0], args.seed)
        lines += [
            f"\n{steps} steps:\n",
            "| change | blocks | FLUX.1-costed | mean PSNR | min PSNR |",
            "|---|---|---|---|---|",
        ]
        for name, change in ROWS:
            config = BenchConfig(name, "h2cache", "h2-forecast", {**TAUS, **PAPER_RULE, **change})
            point = measure(config, installer, pipe, counter, prompts, args.seed, call, references, None)
            point["steps"] = steps
            results.append(point)
            lines.append(
                f"| {name} | {100 * point['blocks']:.1f}% | {100 * point['flux_costed']:.1f}% | "
                f"{point['mean_psnr']:.1f} dB | {point['min_psnr']:.1f} dB |"
            )
            print(lines[-1], flush=True)
    header = f"{args.model}, {len(prompts)} grammar prompts, seeds from {args.seed}, tau1 0.15 / tau2 0.22\n"
    write_json(args.out / "ablation.json", {"model": args.model, "points": results})
    write_text(args.out / "ablation.md", header + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
