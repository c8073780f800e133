"""The speed-fidelity frontier: every h2cache method and the caches users would pick instead, in one process.

    pip install -r requirements-bench.txt
    python benchmarks/frontier.py --steps 50 --out results/frontier-50

Same prompts (the embedded grammar) and seeds for every configuration. Per configuration and prompt, an uncached
call and the cached call run back to back (after one untimed warm-up call of each), so both see the same machine
state; the time ratio is the cached transformer time over the uncached one, summed over the prompts (the end-to-end
ratio, text encoders and VAE included, is kept beside it). With ``--repeats N`` each pair runs N times in turn and
each call's fastest time counts (the overhead benchmark's minimum of interleaved calls): the decisions, and so the
images, are the same every time, so the minimum takes out what the machine added. Fidelity is PSNR and SSIM (LPIPS
when its weights are in --weights-dir) against the uncached image of the same prompt and seed.

Blocks are counted the same way for every family: a block counts as computed when its attention's query
normalisation (``norm_q``) ran. Hook-based caches (diffusers' hooks, cache-dit) replace a block's ``forward`` but keep
its ``__call__``, so a forward hook on the block itself fires even when the block is skipped; ``norm_q`` runs only
inside a real attention computation, with separate or fused (``to_qkv``) projections alike. Caches that skip only
some sub-modules of a block (diffusers' TaylorSeer forecasts attention and MLP outputs) are counted by their
attention. "FLUX.1-costed" charges the same per-step decisions at FLUX.1's 19 double + 38 single blocks: a stage
whose blocks all ran costs the whole stage, otherwise what ran (a stage hit costs its probe).

Outputs in --out, each written atomically: ``points.json`` (every configuration and prompt), ``frontier.md`` (the
lowest time ratio per family at mean PSNR >= 35/40/45/50 dB), ``frontier.png`` (Pareto frontiers).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FLUX_DOUBLE, FLUX_SINGLE = 19, 38
PSNR_LEVELS = (35.0, 40.0, 45.0, 50.0)
PLOT_PSNR_CAP = 70.0  # identical images score inf; plotted at the cap


@dataclass
class BenchConfig:
    """One point of the sweep: a family (one line of the plot and one row of the table) and its parameters."""

    family: str
    kind: str  # "h2cache", "diffusers" or "cache-dit"
    method: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family} " + ",".join(f"{k}={v}" for k, v in self.params.items())

    @property
    def settings(self) -> dict:
        """Every parameter the cache runs with, defaults resolved (h2cache's), as JSON stores them: a point measured
        before a default changed has the same label but other settings, and is measured again."""
        if self.kind != "h2cache":
            return json.loads(json.dumps(self.params))
        from h2cache.methods import resolved_settings

        return resolved_settings(self.method, **self.params)


def h2cache_sweep(steps: int) -> list[BenchConfig]:
    scale = steps / 50  # schedule intervals in step units follow the step count
    interval = lambda n: max(2, round(n * scale))  # noqa: E731
    out = [
        BenchConfig("H2-Cache (h2)", "h2cache", "h2", {"tau1": t1, "tau2": t2})
        for t1, t2 in ((0.05, 0.08), (0.1, 0.15), (0.15, 0.22), (0.2, 0.3), (0.3, 0.5))
    ]
    out += [BenchConfig("H2-Forecast", "h2cache", "h2-forecast", params) for params in H2_FORECAST_SWEEP]
    out += [
        BenchConfig("H2-Forecast (independent)", "h2cache", "h2-forecast", {**params, "mode": "independent"})
        for params in H2_FORECAST_INDEPENDENT
    ]
    out += [
        BenchConfig("double FB cache (dbfcache)", "h2cache", "dbfcache", {"tau1": t1, "tau2": t2})
        for t1, t2 in ((0.05, 0.08), (0.1, 0.15), (0.15, 0.22), (0.25, 0.35))
    ]
    out += [
        BenchConfig("Block Cache (fbcache)", "h2cache", "fbcache", {"threshold": t})
        for t in (0.05, 0.08, 0.12, 0.2, 0.3)
    ]
    out += [BenchConfig("TeaCache", "h2cache", "teacache", {"threshold": t}) for t in (0.4, 0.8, 1.2, 1.6, 2.0)]
    out += [
        BenchConfig("TaylorSeer (stage)", "h2cache", "taylorseer", {"interval": interval(n)}) for n in (4, 6, 8, 10, 12)
    ]
    out += [
        BenchConfig("HiCache (stage)", "h2cache", "hicache", {"interval": interval(n)}) for n in (6, 8, 10, 12, 14, 16)
    ]
    return out


H2_FORECAST_SWEEP = (
    # Threshold and run window together, from the cheap end to the faithful one: a stage computes, is forecast for
    # min_run of the steps unprobed, then its probe decides until max_run. On the shipped model (50 steps, six
    # prompts, warmup 1) they computed 8.2 / 10.2 (the defaults) / 12.3 / 14.3 / 17.0% of the blocks at 41.5 / 46.1 /
    # 47.4 / 49.4 / 51.5 dB.
    [
        {"tau1": t, "tau2": t, "min_run": low, "max_run": high}
        for t, low, high in (
            (0.3, 0.2, 0.26),
            (0.3, 0.16, 0.2),
            (0.2, 0.12, 0.16),
            (0.15, 0.1, 0.14),
            (0.1, 0.08, 0.12),
            (0.1, 0.06, 0.1),
            (0.05, 0.04, 0.08),
        )
    ]
    # The probes alone deciding (no floor), as the former defaults (0.3 / 0.3, max_run 0.24) and the highest
    # fidelity
    + [{"tau1": t, "tau2": t, "min_run": 0, "max_run": 0.24} for t in (0.05, 0.1, 0.3)]
)
# The same decisions with both probes judged at every step they run (no chaining)
H2_FORECAST_INDEPENDENT = [H2_FORECAST_SWEEP[i] for i in (0, 1, 3, 5)]


def peer_sweep(steps: int) -> list[BenchConfig]:
    scale = steps / 50
    out = [
        BenchConfig("diffusers FirstBlockCache", "diffusers", "fbc", {"threshold": t})
        for t in (0.05, 0.1, 0.2, 0.3, 0.4)
    ]
    out += [
        BenchConfig(
            "diffusers TaylorSeerCache", "diffusers", "taylorseer", {"cache_interval": max(2, round(n * scale))}
        )
        for n in (3, 5, 7, 9)
    ]
    out += [
        BenchConfig("diffusers MagCache", "diffusers", "magcache", {"threshold": t, "max_skip_steps": k})
        for t, k in ((0.06, 3), (0.12, 4), (0.24, 5), (0.5, 8))
    ]
    out += [
        BenchConfig("cache-dit DBCache F1B0", "cache-dit", "dbcache", {"threshold": t}) for t in (0.05, 0.1, 0.2, 0.3)
    ]
    out += [
        BenchConfig("cache-dit DBCache F1B0 + TaylorSeer", "cache-dit", "dbcache", {"threshold": t, "taylorseer": 1})
        for t in (0.1, 0.2, 0.4, 0.8)
    ]
    return out


# --- installing and removing each family's cache -------------------------------------------------------------------
class Installer:
    """Puts one configuration's cache on the pipeline and takes it off; calibrates MagCache once per run."""

    def __init__(self, pipe, call: dict, calibration_prompt: str, seed: int):
        self.pipe, self.call, self.calibration_prompt, self.seed = pipe, call, calibration_prompt, seed
        self._mag_ratios = None

    def install(self, config: BenchConfig) -> None:
        if config.kind == "h2cache":
            import h2cache

            h2cache.apply(self.pipe, config.method, **config.params)
        elif config.kind == "diffusers":
            self.pipe.transformer.enable_cache(self._diffusers_config(config))
        else:
            self._enable_cache_dit(config)

    def remove(self, config: BenchConfig) -> None:
        if config.kind == "h2cache":
            import h2cache

            h2cache.remove(self.pipe)
        elif config.kind == "diffusers":
            self.pipe.transformer.disable_cache()
        else:
            import cache_dit

            cache_dit.disable_cache(self.pipe)

    def _diffusers_config(self, config: BenchConfig):
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        steps = self.call["num_inference_steps"]
        if config.method == "fbc":
            return FirstBlockCacheConfig(**config.params)
        if config.method == "taylorseer":
            return TaylorSeerCacheConfig(**config.params)
        return MagCacheConfig(num_inference_steps=steps, mag_ratios=self.mag_ratios(), **config.params)

    def mag_ratios(self) -> list[float]:
        """MagCache's calibration on this model, as its documentation prescribes: one call with ``calibrate=True``,
        which prints the per-step magnitude ratios to pass as ``mag_ratios``."""
        if self._mag_ratios is None:
            from diffusers import MagCacheConfig

            steps = self.call["num_inference_steps"]
            self.pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                run_once(self.pipe, self.calibration_prompt, self.seed, self.call)
            self.pipe.transformer.disable_cache()
            lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
            if not lists:
                raise RuntimeError("MagCache calibration printed no ratios: diffusers' MagCache output changed")
            self._mag_ratios = [float(v) for v in ast.literal_eval(lists[-1])]
        return self._mag_ratios

    def _enable_cache_dit(self, config: BenchConfig) -> None:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        params = dict(config.params)
        order = params.pop("taylorseer", None)
        cache = DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            residual_diff_threshold=params.pop("threshold"),
            num_inference_steps=self.call["num_inference_steps"],
            **params,
        )
        calibrator = None if order is None else TaylorSeerCalibratorConfig(taylorseer_order=order)
        cache_dit.enable_cache(self.pipe, cache_config=cache, calibrator_config=calibrator)


# --- measuring -----------------------------------------------------------------------------------------------------
class BlockCounter:
    """Per transformer forward, how many double and single blocks really computed (their attention's ``norm_q``)."""

    def __init__(self, transformer):
        self.forwards: list[list[int]] = []
        self.num_double = len(transformer.transformer_blocks)
        self.num_single = len(transformer.single_transformer_blocks)
        self.seconds = 0.0
        self._start = None
        transformer.register_forward_pre_hook(self._begin)
        transformer.register_forward_hook(self._end)
        for stage, blocks in enumerate((transformer.transformer_blocks, transformer.single_transformer_blocks)):
            for block in blocks:
                block.attn.norm_q.register_forward_hook(lambda *_, stage=stage: self._count(stage))

    def _begin(self, *_):
        self.forwards.append([0, 0])
        self._start = time.perf_counter()

    def _end(self, *_):
        self.seconds += time.perf_counter() - self._start

    def _count(self, stage: int) -> None:
        if self.forwards:
            self.forwards[-1][stage] += 1

    def take(self) -> tuple[list[list[int]], float]:
        forwards, seconds = self.forwards, self.seconds
        self.forwards, self.seconds = [], 0.0
        return forwards, seconds


def block_shares(forwards: list[list[int]], num_double: int, num_single: int) -> tuple[float, float]:
    """(share of blocks computed, the same decisions FLUX.1-costed): see the module docstring."""
    if not forwards:
        return math.nan, math.nan
    ran = sum(d + s for d, s in forwards) / (len(forwards) * (num_double + num_single))
    costed = sum(
        (FLUX_DOUBLE if d == num_double else d) + (FLUX_SINGLE if s == num_single else s) for d, s in forwards
    ) / (len(forwards) * (FLUX_DOUBLE + FLUX_SINGLE))
    return ran, costed


def run_once(pipe, prompt: str, seed: int, call: dict):
    from h2cache.generate import timed_call

    return timed_call(pipe, prompt, seed, call)


def measure(config, installer, pipe, counter, prompts, seed, call, references, lpips, repeats: int = 1):
    """One configuration: interleaved uncached and cached calls per prompt, ``repeats`` pairs of them with each
    call's fastest time kept; fidelity against ``references``."""
    from eval.metrics.fidelity import psnr, ssim

    installer.install(config)
    try:
        run_once(pipe, prompts[0], seed, dict(call, num_inference_steps=2))  # warm-up, untimed
        counter.take()
        per_prompt = []
        for index, prompt in enumerate(prompts):
            plain_runs, cached_runs = [], []
            for _ in range(repeats):
                installer.remove(config)
                _, plain_total = run_once(pipe, prompt, seed + index, call)
                plain_runs.append((counter.take()[1], plain_total))
                installer.install(config)
                image, total = run_once(pipe, prompt, seed + index, call)
                forwards, seconds = counter.take()
                cached_runs.append((seconds, total))
            plain_seconds, plain_total = (min(times) for times in zip(*plain_runs, strict=True))
            seconds, total = (min(times) for times in zip(*cached_runs, strict=True))
            trace_blocks = None
            if config.kind == "h2cache":  # h2cache's own count, a check on the to_q count
                import h2cache

                summary = h2cache.summary(pipe)
                trace_blocks = summary["blocks_run"] / summary["blocks_total"]
            pixels = np.array(image)
            ran, costed = block_shares(forwards, counter.num_double, counter.num_single)
            per_prompt.append(
                {
                    "prompt": prompt,
                    "seed": seed + index,
                    "psnr": psnr(pixels, references[index]),
                    "ssim": ssim(pixels, references[index]),
                    "lpips": None if lpips is None else lpips(pixels, references[index]),
                    "transformer_s": seconds,
                    "transformer_s_runs": [run[0] for run in cached_runs],
                    "uncached_transformer_s_runs": [run[0] for run in plain_runs],
                    "uncached_transformer_s": plain_seconds,
                    "total_s": total,
                    "uncached_total_s": plain_total,
                    "blocks": ran,
                    "flux_costed": costed,
                    "trace_blocks": trace_blocks,
                }
            )
    finally:
        installer.remove(config)
    return summarize_point(config, per_prompt)


def summarize_point(config: BenchConfig, per_prompt: list[dict]) -> dict:
    mean = lambda key: float(np.mean([p[key] for p in per_prompt]))  # noqa: E731
    lpips = [p["lpips"] for p in per_prompt if p["lpips"] is not None]
    return {
        **asdict(config),
        "label": config.label,
        "settings": config.settings,
        "time_ratio": sum(p["transformer_s"] for p in per_prompt)
        / sum(p["uncached_transformer_s"] for p in per_prompt),
        "end_to_end_ratio": sum(p["total_s"] for p in per_prompt) / sum(p["uncached_total_s"] for p in per_prompt),
        "blocks": mean("blocks"),
        "flux_costed": mean("flux_costed"),
        "mean_psnr": mean("psnr"),  # inf when an image is identical to its reference
        "min_psnr": float(np.min([p["psnr"] for p in per_prompt])),
        "mean_ssim": mean("ssim"),
        "mean_lpips": float(np.mean(lpips)) if lpips else None,
        "per_prompt": per_prompt,
    }


# --- frontier, table, plot -----------------------------------------------------------------------------------------
def pareto(points: list[dict], x: str = "time_ratio") -> list[dict]:
    """The points no other point beats on both ``x`` (lower) and mean PSNR (higher), by increasing ``x``."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[x], -p["mean_psnr"])):
        if point["mean_psnr"] > best:
            front.append(point)
            best = point["mean_psnr"]
    return front


def lowest_at(points: list[dict], level: float, x: str = "time_ratio") -> dict | None:
    """The point with the lowest ``x`` among those whose mean PSNR is at least ``level``."""
    passing = [p for p in points if p["mean_psnr"] >= level]
    return min(passing, key=lambda p: (p[x], -p["mean_psnr"])) if passing else None


def by_family(points: list[dict]) -> dict[str, list[dict]]:
    families: dict[str, list[dict]] = {}
    for point in points:
        families.setdefault(point["family"], []).append(point)
    return families


def format_table(points: list[dict], levels=PSNR_LEVELS) -> str:
    """Per family and PSNR level: the lowest time ratio reached, and that point's block and FLUX.1-costed share;
    then the same for the FLUX.1-costed share on its own (what the time ratio becomes on FLUX.1's proportions)."""
    head = "| family | " + " | ".join(f">= {level:g} dB" for level in levels) + " |"
    rule = "|---" * (len(levels) + 1) + "|"
    time_rows, cost_rows = [head, rule], [head, rule]
    for family, members in by_family(points).items():
        cells, costs = [], []
        for level in levels:
            best = lowest_at(members, level)
            cells.append("—" if best is None else f"{best['time_ratio']:.3f} ({100 * best['blocks']:.0f}% blocks)")
            cheapest = lowest_at(members, level, x="flux_costed")
            costs.append("—" if cheapest is None else f"{100 * cheapest['flux_costed']:.1f}%")
        time_rows.append(f"| {family} | " + " | ".join(cells) + " |")
        cost_rows.append(f"| {family} | " + " | ".join(costs) + " |")
    return (
        "Lowest transformer time ratio (cached / uncached) at mean PSNR >= level, with that point's share of "
        "blocks computed (— : no configuration reached the level):\n\n"
        + "\n".join(time_rows)
        + "\n\nLowest FLUX.1-costed share of blocks (the same decisions charged at 19 + 38 blocks) at mean PSNR >= "
        "level:\n\n" + "\n".join(cost_rows) + "\n"
    )


def family_styles(kinds: dict[str, str]) -> dict[str, dict]:
    """A line style per family (``kinds``: family -> "h2cache" or the peer library), each one of its own.

    The sweep has 13 families, more than tab10's colours: tab20's dark shades go first, then its light ones; peers'
    lines are dashed and the markers cycle, so two families never share a look."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    return {
        family: {
            "color": palette((2 * index) % 20 + (index // 10) % 2),
            "linestyle": "-" if kind == "h2cache" else "--",
            "marker": "osD^v"[index % 5],
        }
        for index, (family, kind) in enumerate(kinds.items())
    }


def plot_frontier(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from h2cache.io import atomic_path

    figure, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    families = by_family(points)
    styles = family_styles({family: members[0]["kind"] for family, members in families.items()})
    for axis, x, xlabel in (
        (axes[0], "time_ratio", "transformer time, cached / uncached"),
        (axes[1], "flux_costed", "FLUX.1-costed share of blocks"),
    ):
        for family, members in families.items():
            front = pareto(members, x)
            ys = [min(p["mean_psnr"], PLOT_PSNR_CAP) for p in front]
            own = family == "H2-Forecast"
            axis.plot(
                [p[x] for p in front],
                ys,
                **styles[family],
                label=family,
                linewidth=2.5 if own else 1.2,
                markersize=5,
                zorder=3 if own else 2,
            )
        for level in PSNR_LEVELS:
            axis.axhline(level, color="0.85", linewidth=0.8, zorder=1)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean PSNR vs uncached (dB)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


# --- the run -------------------------------------------------------------------------------------------------------
def load_model(model: str):
    from h2cache.embedded import CALL_DEFAULTS_FILE, load_folder
    from h2cache.models import load_pipeline

    folder = Path(model)
    if (folder / CALL_DEFAULTS_FILE).is_file():
        return load_folder(folder)
    return load_pipeline(model)


def select(configs: list[BenchConfig], families: str | None, per_family: int | None) -> list[BenchConfig]:
    if families:
        wanted = {name.strip().lower() for name in families.split(",")}
        configs = [c for c in configs if c.method.lower() in wanted or c.family.lower() in wanted]
    if per_family:
        kept, seen = [], {}
        for config in configs:
            seen[config.family] = seen.get(config.family, 0) + 1
            if seen[config.family] <= per_family:
                kept.append(config)
        configs = kept
    return configs


def measured_before(path: Path, run: dict) -> dict[str, dict]:
    """The points an earlier, interrupted run of the same model, steps, prompts, seed and repeats left in ``path``."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = all(earlier.get("run", {}).get(key) == value for key, value in run.items())
    return {point["label"]: point for point in earlier.get("points", [])} if same else {}


def peers_available() -> list[str]:
    """Why a peer family cannot run, one line each (empty when all can)."""
    problems = []
    try:
        import cache_dit  # noqa: F401
    except ImportError as error:
        problems.append(f"cache-dit not importable ({error}): pip install -r requirements-bench.txt")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, an embedded model folder, or as run.py's --model")
    parser.add_argument("--steps", type=int, default=50, choices=(28, 50, 100), help="denoising steps")
    parser.add_argument("--prompts", type=int, default=6, help="grammar prompts (the same for every configuration)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--families", help="comma-separated methods or family names to run (default: all)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed uncached / cached pairs per prompt, fastest kept (default 1)"
    )
    parser.add_argument("--per-family", type=int, help="at most N configurations per family (quick runs)")
    parser.add_argument("--weights-dir", help="metric weights (LPIPS is scored when its AlexNet file is there)")
    parser.add_argument("--out", type=Path, required=True, help="folder for points.json, frontier.md, frontier.png")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("prompts", "repeats"):
        if getattr(args, name) < 1:
            print(f"frontier: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    configs = select(h2cache_sweep(args.steps) + peer_sweep(args.steps), args.families, args.per_family)
    if not configs:
        print(f"frontier: error: --families {args.families!r} selects no configuration", file=sys.stderr)
        return 2
    problems = peers_available() if any(c.kind == "cache-dit" for c in configs) else []
    if problems:
        print("frontier: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"frontier: error: cannot create --out {args.out}: {error}", file=sys.stderr)
        return 2

    import torch

    from eval.runner import load_prompts
    from h2cache.generate import call_arguments
    from h2cache.io import write_json, write_text

    torch.set_num_threads(1)  # timings comparable across runs and machines with spare cores
    lpips = None
    if args.weights_dir:
        from eval.metrics.fidelity import Lpips
        from eval.weights import MissingWeightsError, configure_environment

        configure_environment(args.weights_dir)
        try:
            lpips = Lpips()
        except MissingWeightsError:
            print("frontier: LPIPS weights missing: scoring PSNR and SSIM only")

    pipe = load_model(args.model)
    pipe.set_progress_bar_config(disable=True)
    call = call_arguments(pipe, steps=args.steps)
    prompts = [p for _, p in load_prompts(f"grammar:{args.prompts}")]
    counter = BlockCounter(pipe.transformer)
    run_once(pipe, prompts[0], args.seed, dict(call, num_inference_steps=2))
    references = [np.array(run_once(pipe, p, args.seed + i, call)[0]) for i, p in enumerate(prompts)]
    counter.take()
    installer = Installer(pipe, call, prompts[0], args.seed)

    run = {
        "model": args.model,
        "steps": call["num_inference_steps"],
        "prompts": prompts,
        "seed": args.seed,
        "repeats": args.repeats,
    }
    done = measured_before(args.out / "points.json", run)
    points, started = [], time.perf_counter()
    for number, config in enumerate(configs, start=1):
        point = done.get(config.label)
        reused = point is not None and point.get("settings") == config.settings
        if not reused:
            point = measure(config, installer, pipe, counter, prompts, args.seed, call, references, lpips, args.repeats)
        points.append(point)
        print(
            f"[{number}/{len(configs)}] {config.label}: time {point['time_ratio']:.3f}, blocks "
            f"{100 * point['blocks']:.1f}% (FLUX.1-costed {100 * point['flux_costed']:.1f}%), "
            f"PSNR {point['mean_psnr']:.2f} dB" + (" (measured before)" if reused else ""),
            flush=True,
        )
        # Every point is on disk as soon as it is measured: an interrupted run continues from here.
        write_json(args.out / "points.json", {"run": run, "points": list({**done, config.label: point}.values())})
        done[config.label] = point
    info = {
        **run,
        "blocks": [counter.num_double, counter.num_single],
        "mag_ratios": installer._mag_ratios,
        "torch_threads": 1,
        "seconds": time.perf_counter() - started,
    }
    table = format_table(points)
    write_json(args.out / "points.json", {"run": info, "points": points})
    timing = f", fastest of {args.repeats} timed pairs per prompt" if args.repeats > 1 else ""
    heading = f"{args.model}, {info['steps']} steps, {len(prompts)} prompts{timing}"
    write_text(args.out / "frontier.md", f"{heading}\n\n{table}")
    blocks = f"{counter.num_double}+{counter.num_single} blocks"
    title = f"{args.model} ({blocks}), {info['steps']} steps, {len(prompts)} prompts, seeds from {args.seed}"
    plot_frontier(points, args.out / "frontier.png", title)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
