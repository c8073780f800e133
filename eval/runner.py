"""The experiment runner: prompts x method configurations -> images, per-image records, metrics, table, figures.

    python -m eval.runner --prompts eval/prompts/cute80.jsonl --config baseline \\
        --config "fbcache:threshold=0.12,label=Block Cache" --config "h2:tau1=0.15,tau2=0.22,label=H2-Cache" \\
        --steps 100 --height 1024 --width 1024 --out results/cute80

Layout of ``--out``: ``images/<config>/<prompt id>.png``, ``records/<config>/<prompt id>.json`` (one per image,
written atomically), ``records.jsonl`` (all of them), ``table.{md,csv,json}``, ``figures/``.

- Resumable: an image whose record exists, made with the same resolved method settings, is never generated again;
  a killed run leaves no partial file.
- Timing: one untimed warm-up call per configuration and process, then ``time_s`` around each call
  (CUDA-synchronised); model loading and scoring are never timed.
- The baseline is the native, unpatched pipeline (nunchaku's fused forward on V1, diffusers' own forward), so
  speedups are against what a user runs without h2cache; ``none`` (h2cache's block loop, caching nothing) is an
  ordinary row beside it and shows what owning the forward costs.
- Sharding: under ``accelerate launch --multi_gpu --num_processes N`` (on CPUs too: it is accelerate's
  torchrun-based launcher, while ``--cpu`` starts a single process unless MPI is set up) or ``torchrun``, prompt i
  goes to process i % N, one GPU each; the main process scores and tabulates once every process is done. Same
  seed per prompt, so the images do not depend on the process count.
- Weights for metrics are checked before any generation (exit code 3 with a table of missing files).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eval.weights import EXIT_MISSING_WEIGHTS, MissingWeightsError, add_weights_arguments

BASELINE_LABEL = "baseline"
NATIVE = "native"  # the method of the baseline: no h2cache at all


@dataclass
class RunConfig:
    """One method configuration of an experiment: ``label`` names its folder and its table row."""

    label: str
    method: str
    params: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The label as a folder name: lower case, no spaces ("Block Cache" -> "block-cache")."""
        return re.sub(r"[^a-z0-9.=]+", "-", self.label.lower()).strip("-")

    @property
    def settings(self) -> dict:
        """Every parameter the cache runs with, defaults resolved, as JSON stores them (empty for the baseline)."""
        if self.method == NATIVE:
            return {}
        from h2cache.methods import resolved_settings

        return resolved_settings(self.method, **self.params)


def parse_config(text: str) -> RunConfig:
    """``"baseline"`` (the unpatched pipeline), ``"none"`` (h2cache's loop, caching nothing) or
    ``"method:key=value,...[,label=Name]"``; values are parsed as JSON where they can be."""
    text = text.strip()
    if text in (BASELINE_LABEL, NATIVE):
        return RunConfig(BASELINE_LABEL, NATIVE)
    if text == "none":
        return RunConfig("h2cache none", "none")
    method, _, rest = text.partition(":")
    params, label = {}, None
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"config {text!r}: expected key=value, got {item!r}")
        if key == "label":
            label = value
            continue
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    label = label or "_".join([method] + [f"{k}{v}" for k, v in params.items()])
    return RunConfig(label, method, params)


def load_prompts(source: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(prompt id, prompt)`` pairs from CUTE80's jsonl, the 220-prompt jsonl, a text file (one prompt a line), or
    ``grammar:N`` (N captions of the embedded model's grammar, for CPU runs)."""
    if source.startswith("grammar:"):
        import numpy as np

        from h2cache.embedded.grammar import random_scene

        rng = np.random.default_rng(2024)  # fixed, and apart from the training seeds
        prompts = [(f"g{i:03d}", random_scene(rng).caption()) for i in range(int(source.split(":", 1)[1]))]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--prompts {source}: no such file")
        prompts = []
        for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                entry = json.loads(line)
                if "image_caption" in entry:  # CUTE80: id from "…/image001.jpg", the caption the authors used
                    prompts.append((entry["file_path"][-12:-4], entry["image_caption"][0]))
                else:
                    prompts.append((str(entry["id"]), entry["prompt"]))
            else:
                prompts.append((f"p{index:03d}", line.strip()))
    return prompts[:limit] if limit else prompts


class Experiment:
    def __init__(self, args, configs: list[RunConfig], prompts: list[tuple[str, str]]):
        self.args, self.configs, self.prompts = args, configs, prompts
        self.out = Path(args.out)

    def image_path(self, config: RunConfig, prompt_id: str) -> Path:
        return self.out / "images" / config.folder / f"{prompt_id}.png"

    def record_path(self, config: RunConfig, prompt_id: str) -> Path:
        return self.out / "records" / config.folder / f"{prompt_id}.json"

    def generate(self, process_index: int = 0, num_processes: int = 1, local_index: int = 0) -> int:
        """Generate this process's share of missing images; returns how many it generated."""
        from h2cache.models import load_lora, load_planned, parse_lora, plan_model

        shard = self.prompts[process_index::num_processes]
        if not any(self.pending(shard).values()):
            return 0
        plan = plan_model(self.args.model, self.args.transformer, self.args.nunchaku_class)
        if plan.device == "cuda":
            plan.device = f"cuda:{local_index}"  # one GPU per process under accelerate launch
        pipe = load_planned(plan)
        if self.args.lora:
            load_lora(pipe, *parse_lora(self.args.lora))
        return self.generate_with(pipe, plan.model, shard)

    def pending(self, shard) -> dict[str, list[tuple[str, str]]]:
        return {c.label: [p for p in shard if not self.done(c, p[0])] for c in self.configs}

    def done(self, config: RunConfig, prompt_id: str) -> bool:
        """Whether the image has a record made with the same settings: one made before a method default changed
        is generated again, not mixed into the table."""
        path = self.record_path(config, prompt_id)
        return path.is_file() and json.loads(path.read_text()).get("settings") == config.settings

    def generate_with(self, pipe, model_name: str, shard) -> int:
        """Generate the missing images of ``shard`` with a loaded pipeline; returns how many it generated."""
        import h2cache
        from h2cache.backends import detect_backend
        from h2cache.generate import call_arguments, timed_call
        from h2cache.io import save_image, write_json

        pending = self.pending(shard)
        call = call_arguments(pipe, self.args.steps, self.args.guidance, self.args.height, self.args.width)
        backend = detect_backend(pipe.transformer)
        native_blocks = call["num_inference_steps"] * (backend.num_double + backend.num_single)
        generated = 0
        for config in self.configs:
            if not pending[config.label]:
                continue
            if config.method != NATIVE:
                h2cache.apply(pipe, config.method, **config.params)
            timed_call(pipe, pending[config.label][0][1], self.args.seed, dict(call, num_inference_steps=2))
            for prompt_id, prompt in pending[config.label]:
                image, seconds = timed_call(pipe, prompt, self.args.seed, call)
                if config.method == NATIVE:
                    totals, trace = {"blocks_run": native_blocks, "blocks_total": native_blocks}, []
                else:
                    totals, trace = h2cache.summary(pipe), h2cache.stats(pipe)
                save_image(self.image_path(config, prompt_id), image)
                write_json(
                    self.record_path(config, prompt_id),
                    {
                        "config": config.label,
                        "method": config.method,
                        "params": config.params,
                        "settings": config.settings,
                        "prompt_id": prompt_id,
                        "prompt": prompt,
                        "seed": self.args.seed,
                        "model": model_name,
                        "steps": call["num_inference_steps"],
                        "guidance": call["guidance_scale"],
                        "height": image.height,
                        "width": image.width,
                        "time_s": seconds,
                        "blocks_run": totals["blocks_run"],
                        "blocks_total": totals["blocks_total"],
                        "image": str(self.image_path(config, prompt_id).relative_to(self.out)),
                        "trace": trace,
                    },
                )
                generated += 1
            h2cache.remove(pipe)
        return generated

    def records(self) -> list[dict]:
        out = []
        for config in self.configs:
            for prompt_id, _ in self.prompts:
                path = self.record_path(config, prompt_id)
                if path.is_file():
                    out.append(json.loads(path.read_text()))
        return out

    def score(self, suite) -> None:
        """Add the requested metrics to every record that lacks them; fidelity is against the baseline image."""
        from eval.tables import dumps_record
        from h2cache.io import write_text

        baseline = next((c for c in self.configs if c.method == NATIVE), None)
        for config in self.configs:
            for prompt_id, _ in self.prompts:
                path = self.record_path(config, prompt_id)
                if not path.is_file():
                    continue
                record = json.loads(path.read_text())
                if all(metric in record for metric in suite.metrics):
                    continue
                reference = None
                if baseline is not None and config is not baseline:
                    reference = self.image_path(baseline, prompt_id)
                record.update(suite.score(self.image_path(config, prompt_id), reference))
                write_text(path, dumps_record(record) + "\n")

    def report(self) -> str:
        """Write records.jsonl, the table and the figures; return the table as markdown."""
        from eval.figures import plot_image_grid, plot_speed_quality
        from eval.tables import build_table, dumps_record, format_table, write_table
        from h2cache.io import write_text

        records = self.records()
        write_text(self.out / "records.jsonl", "".join(dumps_record(r) + "\n" for r in records))
        rows = build_table(records)
        write_table(rows, self.out)
        if any(row.metrics[m].mean is not None for row in rows if not row.is_baseline for m in ("psnr", "ssim")):
            plot_speed_quality(rows, self.out / "figures" / "speed_quality.png")
        first_id = self.prompts[0][0]
        grid = [(c.label, self.image_path(c, first_id)) for c in self.configs if self.image_path(c, first_id).is_file()]
        if grid:
            plot_image_grid(grid, self.out / "figures" / f"grid_{first_id}.png", title=self.prompts[0][1][:90])
        return format_table(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="cute80/220-prompt jsonl, a text file, or grammar:N")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        dest="configs",
        help='"baseline" (the unpatched pipeline), "none" (h2cache\'s loop alone) or '
        '"method:key=value,...[,label=Name]"; repeat for each configuration',
    )
    parser.add_argument("--out", required=True, type=Path, help="results folder (resumed if it exists)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--model", default="auto", help="as run.py's --model")
    parser.add_argument("--transformer", default=None, help="as run.py's --transformer")
    parser.add_argument(
        "--nunchaku-class",
        default="v1",
        choices=["auto", "v1", "v2"],
        help="nunchaku class (v1: the paper's, and the one with the LoRA API; auto: v2, but v1 on Turing)",
    )
    parser.add_argument("--lora", default=None, metavar="PATH:SCALE", help="a LoRA and its strength")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    parser.add_argument("--height", type=int, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, help="image width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of every prompt (the paper: 0)")
    parser.add_argument("--metrics", default="clip_iqa,psnr,ssim,lpips", help="comma-separated metrics to score")
    add_weights_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        configs = [parse_config(text) for text in args.configs]
        prompts = load_prompts(args.prompts, args.limit)
        from h2cache.methods import build_method

        for config in configs:
            if config.method != NATIVE:
                build_method(config.method, **config.params)
    except ValueError as error:
        print(f"eval.runner: error: {error}", file=sys.stderr)
        return 2
    if sum(c.method == NATIVE for c in configs) != 1 or len({c.folder for c in configs}) != len(configs):
        print("eval.runner: error: give exactly one baseline config and unique labels", file=sys.stderr)
        return 2

    import torch
    from accelerate import PartialState

    from eval.metrics.suite import MetricSuite

    # cpu=True lets torchrun-style launches (accelerate launch --multi_gpu, torchrun) shard over CPU processes.
    state = PartialState(cpu=not torch.cuda.is_available())
    if not torch.cuda.is_available():
        # float32 reductions depend on the thread count: one thread per process makes the images independent of
        # how many processes share the prompts (CPU parallelism comes from --processes instead).
        torch.set_num_threads(1)
    suite = MetricSuite(args.weights_dir, metrics=args.metrics.split(","), skip_missing=args.skip_missing)
    try:
        missing = suite.preflight()
    except MissingWeightsError as error:
        if state.is_main_process:
            print(str(error), file=sys.stderr)
        return EXIT_MISSING_WEIGHTS
    if missing and state.is_main_process:
        print(f"eval.runner: weights missing, those columns will read n/a: {sorted({m.metric for m in missing})}")

    from h2cache.models import SetupError

    experiment = Experiment(args, configs, prompts)
    try:
        generated = experiment.generate(state.process_index, state.num_processes, state.local_process_index)
    except SetupError as error:
        print(f"eval.runner: error: {error}", file=sys.stderr)
        return 1
    print(f"eval.runner: process {state.process_index}: generated {generated} image(s)")
    state.wait_for_everyone()
    if state.is_main_process:
        experiment.score(suite)
        print(experiment.report(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
