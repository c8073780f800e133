"""Generate one FLUX image with a cache: ``python run.py --prompt "..."``.

Edit the constants below, or override any of them with a flag (``python run.py --help``). With an NVIDIA GPU and
nunchaku this runs 4-bit FLUX.1-dev; with a GPU and no nunchaku, bf16 diffusers FLUX.1-dev; without CUDA, the
embedded CPU model. It writes the PNG, a JSON record beside it (parameters, timing, blocks run, per-step trace)
and, with --plot, the probe distances against their thresholds.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

from h2cache.config import H2_FORECAST_MODES
from h2cache.generate import check_call_values
from h2cache.models import parse_lora

# --- editable defaults ---------------------------------------------------------------------------------------------
PROMPT = "a small red circle on the left against a white background"  # a caption the embedded model knows
MODEL = "auto"  # auto | tiny | random | nunchaku | diffusers | <local diffusers folder> | <hub id>
TRANSFORMER = None  # nunchaku safetensors file or org/repo/file (default: FLUX.1-dev for this GPU's precision)
NUNCHAKU_CLASS = "auto"  # auto (v2; v1 on Turing) | v2 (per-block modules) | v1 (fused C++ model; has the LoRA API)
METHOD = "h2"  # none | h2 | h2-forecast | dbfcache | fbcache (Block Cache) | teacache | taylorseer | hicache
THRESHOLD = None  # fbcache / teacache threshold (None: the method's default, 0.12 / 0.6)
INTERVAL = ORDER = None  # taylorseer / hicache interval, and their / h2-forecast's order (None: the method's)
TAU1 = TAU2 = None  # structure / detail thresholds (None: the method's; h2: 0.15 / 0.22, the authors' values)
MAX_RUN = None  # h2-forecast: longest run of forecasts, a share of the steps (None: the method's default)
MIN_RUN = None  # h2-forecast: forecasts after a computation before the probe decides, a share of the steps
WARMUP = None  # h2-forecast: leading steps computed in full (None: the method's, 1)
LAZY_PROBES = None  # h2-forecast: skip probes predicted below this share of tau (0: every probe; None: the method's)
POOL1, POOL2 = 2048, 384  # PFS divisors: pooling kernel = max(1, tokens // divisor)
MODE = None  # official: a stage-1 hit forces stage 2 | independent: stage 2 judged alone | chained (h2-forecast)
STEPS = None  # None: the model's default (50 for FLUX.1-dev, the embedded model's own)
GUIDANCE = None  # None: the model's default (3.5 for FLUX.1-dev)
HEIGHT = WIDTH = None  # None: the model's native size (1024 for FLUX.1-dev); multiples of 16
SEED = 0
OUT = "outputs"
LORA = None  # "path/to/lora.safetensors:0.8"
# -------------------------------------------------------------------------------------------------------------------

MODEL_DEFAULT = "the model's"


def build_parser() -> argparse.ArgumentParser:
    from h2cache import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arg = functools.partial(add_argument, parser)

    arg("--prompt", default=PROMPT, help="what to draw")
    arg("--method", default=METHOD, choices=sorted(METHODS), help="cache method")
    arg(
        "--tau1",
        type=float,
        default=TAU1,
        help="H2-Cache / H2-Forecast structure threshold (double-stream stage)",
        shown="the method's: h2 0.15, h2-forecast 0.3",
    )
    arg(
        "--tau2",
        type=float,
        default=TAU2,
        help="H2-Cache / H2-Forecast detail threshold (single-stream stage)",
        shown="the method's: h2 0.22, h2-forecast 0.3",
    )
    arg("--pool1", type=int, default=POOL1, help="stage-1 PFS divisor (kernel = max(1, image tokens // pool1))")
    arg("--pool2", type=int, default=POOL2, help="stage-2 PFS divisor (kernel = max(1, all tokens // pool2))")
    arg(
        "--threshold",
        type=float,
        default=THRESHOLD,
        help="Block Cache / TeaCache threshold",
        shown="the method's: fbcache 0.12, teacache 0.6",
    )
    arg(
        "--interval",
        type=int,
        default=INTERVAL,
        help="TaylorSeer / HiCache: compute every N-th step",
        shown="the method's: taylorseer 6, hicache 7",
    )
    arg(
        "--order",
        type=int,
        default=ORDER,
        help="TaylorSeer / HiCache / H2-Forecast: forecast order",
        shown="the method's: taylorseer 1, hicache 2, h2-forecast 2",
    )
    arg(
        "--max-run",
        type=float,
        default=MAX_RUN,
        help="H2-Forecast: longest run of forecasts per stage, as a share of the steps",
        shown="the method's: 0.2",
    )
    arg(
        "--min-run",
        type=float,
        default=MIN_RUN,
        help="H2-Forecast: forecasts after a stage computes before its probe decides, as a share of the steps",
        shown="the method's: 0.16",
    )
    arg(
        "--warmup",
        type=int,
        default=WARMUP,
        help="H2-Forecast: leading steps computed in full before any forecast",
        shown="the method's: 1",
    )
    arg(
        "--lazy-probes",
        type=float,
        default=LAZY_PROBES,
        help="H2-Forecast: skip a probe while its distance, grown at its last measured rate, stays below this share "
        "of the threshold (0 runs every probe)",
        shown="the method's: 0.5",
    )
    arg(
        "--mode",
        default=MODE,
        choices=H2_FORECAST_MODES,
        help="stage coupling (chained: h2-forecast only)",
        shown="the method's: h2 official, h2-forecast chained",
    )
    arg(
        "--no-pfs", dest="pfs", action="store_false", help="compare full residuals instead of PFS thumbnails (ablation)"
    )
    arg("--steps", type=int, default=STEPS, help="denoising steps")
    arg("--guidance", type=float, default=GUIDANCE, help="distilled guidance scale")
    arg("--height", type=int, default=HEIGHT, help="image height in pixels, a multiple of 16")
    arg("--width", type=int, default=WIDTH, help="image width in pixels, a multiple of 16")
    arg("--seed", type=int, default=SEED, help="random seed of the initial noise")
    add_model_arguments(parser)
    arg(
        "--lora",
        default=LORA,
        metavar="PATH[:SCALE]",
        help="a LoRA file and its strength (1.0 if omitted)",
        shown="none",
    )
    arg("--out", default=OUT, type=Path, help="output folder")
    arg("--plot", action="store_true", help="also write a PNG of the probe distances against the thresholds")
    arg(
        "--baseline",
        action="store_true",
        help="also time the native, unpatched pipeline (nunchaku's fused forward on V1) and h2cache's `none`, after "
        "one warm-up call, and report the speedup against the native time",
    )
    return parser


def add_argument(parser, *names, help, shown=None, **options) -> None:
    """``parser.add_argument`` with the default appended to the help (``shown`` words it, e.g. "the method's")."""
    if "action" not in options:
        default = options.get("default")
        help = f"{help} (default: {shown or (MODEL_DEFAULT if default is None else default)})"
    parser.add_argument(*names, help=help, **options)


def add_model_arguments(parser) -> None:
    """--model, --transformer and --nunchaku-class: the model choice run.py and app.py share."""
    arg = functools.partial(add_argument, parser)
    arg("--model", default=MODEL, help="auto, tiny, random, nunchaku, diffusers, a local diffusers folder or a hub id")
    arg(
        "--transformer",
        default=TRANSFORMER,
        help="nunchaku transformer: safetensors file or org/repo/file",
        shown="FLUX.1-dev at this GPU's precision",
    )
    arg("--nunchaku-class", default=NUNCHAKU_CLASS, choices=["auto", "v1", "v2"], help="nunchaku transformer class")


def fail(message: str) -> None:
    print(f"run.py: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def method_params(args) -> dict:
    """The flags that are parameters of the chosen method's config."""
    from h2cache import METHODS

    config_class = METHODS[args.method][0]
    return {f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name, None) is not None}


def writable_folder(folder: Path) -> bool:
    """Whether ``folder`` can be created or written, checked without creating anything."""
    folder = folder.expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def validate(args):
    """Every cheap check, before any model is loaded. Returns the method config and the parsed LoRA."""
    from h2cache.methods import build_method

    try:
        config = build_method(args.method, **method_params(args)).config
    except ValueError as error:
        fail(str(error))
    try:
        check_call_values(args.steps, args.height, args.width)
    except ValueError as error:
        fail(f"--{error}")
    lora = parse_lora(args.lora)
    if lora and not Path(lora[0]).expanduser().is_file():
        fail(f"--lora: no file at {lora[0]}")
    if not writable_folder(args.out):
        fail(f"--out {args.out}: the folder cannot be written; choose another with --out")
    return config, lora


def warn_about_unknown_words(pipe, prompt: str):
    """The embedded model knows only its grammar's words: say which prompt words it will ignore (it still draws)."""
    from h2cache import embedded

    if not embedded.is_embedded(pipe):
        return
    unknown = embedded.unknown_words(pipe, prompt)
    if unknown:
        print(
            f"run.py: warning: the embedded model never saw {', '.join(map(repr, unknown))} and ignores "
            f"{'it' if len(unknown) == 1 else 'them'}; the words it knows: {' '.join(embedded.vocabulary_of(pipe))}",
            file=sys.stderr,
        )


def output_stem(prompt: str, method: str, seed: int) -> str:
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:48].strip("-") or "image"
    return f"{slug}-{method}-seed{seed}"


def main(argv=None, facts=None) -> int:
    args = build_parser().parse_args(argv)
    config, lora = validate(args)

    import h2cache
    from h2cache.backends import detect_backend
    from h2cache.generate import call_arguments, timed_call
    from h2cache.models import SetupError, load_lora, load_planned, plan_model

    try:
        plan = plan_model(args.model, args.transformer, args.nunchaku_class, facts=facts)
    except SetupError as error:
        fail(str(error))
    for notice in plan.notices:
        print(f"run.py: {notice}")

    pipe = load_planned(plan, seed=0)
    pipe.set_progress_bar_config(disable=False)
    warn_about_unknown_words(pipe, args.prompt)
    if lora:
        try:
            load_lora(pipe, *lora)
        except SetupError as error:
            fail(str(error))
    call = call_arguments(pipe, args.steps, args.guidance, args.height, args.width)
    baselines = {}
    if args.baseline:
        timed_call(pipe, args.prompt, args.seed, dict(call, num_inference_steps=2))  # warm-up: kernels, allocator
        baselines["native_time_s"] = timed_call(pipe, args.prompt, args.seed, call)[1]
        h2cache.apply(pipe, "none")
        baselines["none_time_s"] = timed_call(pipe, args.prompt, args.seed, call)[1]
    h2cache.apply(pipe, config)
    image, seconds = timed_call(pipe, args.prompt, args.seed, call)
    if baselines:
        baselines["speedup_time"] = baselines["native_time_s"] / seconds

    trace = h2cache.stats(pipe)
    totals = h2cache.summary(pipe)
    stem = args.out / output_stem(args.prompt, args.method, args.seed)
    record = {
        "prompt": args.prompt,
        "method": config.method,
        "params": config.to_dict(),
        "model": plan.model,
        "kind": plan.kind,
        "backend": detect_backend(pipe.transformer).name,
        "transformer": plan.transformer,
        "device": plan.device,
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "seed": args.seed,
        "steps": call["num_inference_steps"],
        "guidance": call["guidance_scale"],
        "height": image.height,
        "width": image.width,
        "lora": {"path": lora[0], "scale": lora[1]} if lora else None,
        "time_s": seconds,
        **baselines,
        **{key: totals[key] for key in ("double_blocks_run", "single_blocks_run", "blocks_run", "blocks_total")},
        "double_blocks_total": sum(r["double_blocks_total"] for r in trace),
        "single_blocks_total": sum(r["single_blocks_total"] for r in trace),
        "speedup_blocks": totals["speedup_blocks"],
        "image": f"{stem.name}.png",
        "h2cache_version": h2cache.__version__,
        "trace": trace,
    }

    from h2cache.io import save_image, write_json

    save_image(stem.with_suffix(".png"), image)
    write_json(stem.with_suffix(".json"), record)
    if args.plot:
        from eval.trace_plot import plot_probe_distances

        plot_probe_distances(trace, stem.parent / f"{stem.name}-distances.png", config)
    print(
        f"run.py: {config.method} on {record['backend']} ({plan.device}): {record['steps']} steps, "
        f"{totals['blocks_run']}/{totals['blocks_total']} blocks ({totals['speedup_blocks']:.2f}x fewer), "
        f"{seconds:.2f} s -> {stem.with_suffix('.png')}"
    )
    if baselines:
        print(
            f"run.py: native pipeline {baselines['native_time_s']:.2f} s, "
            f"h2cache none {baselines['none_time_s']:.2f} s, {config.method} {seconds:.2f} s: "
            f"{baselines['speedup_time']:.2f}x faster than native"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
