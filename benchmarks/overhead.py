"""Benchmark: what the controller, the PFS check and each method's own work cost, on a FLUX-proportioned CPU model.

    python benchmarks/overhead.py [--reps 7] [--size 256] [--steps 50] [--json results/overhead.json]

1. Controller overhead: the transformer's own forward against h2cache's owned forward with method "none" and with
   H2-Cache at thresholds that never hit (every block runs, plus both probes' residuals and PFS checks). Calls are
   interleaved and the minimum of ``--reps`` timed calls is compared, because wall time on shared machines drifts.
2. One PFS check (pool both residuals, relative L1) against a full-tensor comparison, at FLUX.1's real 1024x1024
   shapes: stage 1 [1, 4096, 3072] with divisor 2048, stage 2 [1, 4608, 3072] with divisor 384.
3. Where a cached call's transformer time goes, per method at its defaults (a FluxPipeline call of ``--steps``
   steps, ``--reps`` calls per method, methods interleaved): the seconds of one double and of one single block as
   they ran, and the time per step spent in the transformer outside its blocks: prologue, epilogue, the loop from
   block to block, and the method's own work (probes' thumbnails, distances, forecasts). Timed with forward hooks on
   this model instance's modules. This is what separates a time ratio from a share of blocks:
   on FLUX.1 a double and a single block cost the same per token (12 d^2 multiply-adds each: q, k, v, out and a 4x
   MLP, against q, k, v, a 4x MLP in and a 5d-to-d projection out), while at this model's tiny shapes a double
   block, which runs every layer twice (image and text stream), takes longer than a single one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h2cache  # noqa: E402
from h2cache.embedded import FLUX_PROPORTIONED, build_pipeline  # noqa: E402
from h2cache.io import write_json  # noqa: E402
from h2cache.pfs import relative_l1, summarize  # noqa: E402


def transformer_inputs(transformer, size: int, text_tokens: int = 32) -> dict:
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    side = size // 16  # packed latent side: 8x VAE, then 2x2 patches
    image_tokens = side * side
    config = transformer.config
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    return dict(
        hidden_states=torch.randn(1, image_tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.8]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
        return_dict=False,
    )


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def controller_overhead(reps: int, size: int) -> dict:
    transformer = build_pipeline(FLUX_PROPORTIONED).transformer
    inputs = transformer_inputs(transformer, size)
    configurations = {
        "unpatched": None,
        "none": ("none", {}),
        "h2_all_miss": ("h2", {"tau1": 0.0, "tau2": 0.0}),
    }
    timings = {name: [] for name in configurations}
    with torch.no_grad():
        for _ in range(reps):  # interleaved rounds: drift hits every configuration alike
            for name, method in configurations.items():
                if method is None:
                    h2cache.remove(transformer)
                else:
                    h2cache.apply(transformer, method[0], **method[1])
                transformer(**inputs)  # warm-up; also gives h2 a reference so the timed call measures
                timings[name].append(best_of(lambda: transformer(**inputs), 1))
    best = {name: min(values) for name, values in timings.items()}
    return {
        "model": f"{FLUX_PROPORTIONED.num_double} double + {FLUX_PROPORTIONED.num_single} single blocks, "
        f"width {FLUX_PROPORTIONED.num_heads * FLUX_PROPORTIONED.head_dim}",
        "image_tokens": (size // 16) ** 2,
        "seconds_per_forward": best,
        "overhead_percent": {
            name: 100 * (best[name] / best["unpatched"] - 1) for name in configurations if name != "unpatched"
        },
    }


def pfs_check_cost(reps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for stage, tokens, divisor in (("stage1", 4096, 2048), ("stage2", 4608, 384)):
        reference = torch.randn(1, tokens, 3072, generator=generator)
        current = reference + 0.1 * torch.randn(1, tokens, 3072, generator=generator)
        stored_thumbnail = summarize(reference, divisor)  # h2cache keeps the reference's thumbnail, not the tensor
        pooled = best_of(lambda t=stored_thumbnail, c=current, d=divisor: relative_l1(t, summarize(c, d)), reps)
        full = best_of(lambda r=reference, c=current: relative_l1(r, c), reps)
        out[stage] = {
            "pfs_ms": 1000 * pooled,
            "full_ms": 1000 * full,
            "stored_elements_pfs": stored_thumbnail.numel(),
            "stored_elements_full": reference.numel(),
        }
    return out


class BlockClock:
    """Seconds spent inside the transformer's forwards and inside its double and single blocks, with call counts."""

    def __init__(self, transformer):
        self.seconds = {"transformer": 0.0, "double": 0.0, "single": 0.0}
        self.calls = {"transformer": 0, "double": 0, "single": 0}
        self._started = {}
        for part, modules in (
            ("transformer", [transformer]),
            ("double", transformer.transformer_blocks),
            ("single", transformer.single_transformer_blocks),
        ):
            for module in modules:
                module.register_forward_pre_hook(lambda *_, part=part: self._start(part))
                module.register_forward_hook(lambda *_, part=part: self._stop(part))

    def _start(self, part: str) -> None:
        self._started[part] = time.perf_counter()

    def _stop(self, part: str) -> None:
        self.seconds[part] += time.perf_counter() - self._started[part]
        self.calls[part] += 1

    def take(self) -> tuple[dict, dict]:
        taken = dict(self.seconds), dict(self.calls)
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)
        return taken


def method_costs(reps: int, size: int, steps: int) -> dict:
    methods = tuple(h2cache.METHODS)
    pipe = build_pipeline(FLUX_PROPORTIONED)
    pipe.set_progress_bar_config(disable=True)
    clock = BlockClock(pipe.transformer)

    def call():
        pipe(
            "a red circle",
            height=size,
            width=size,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )

    totals = {
        method: {"seconds": dict.fromkeys(clock.seconds, 0.0), "calls": dict.fromkeys(clock.calls, 0)}
        for method in methods
    }
    outside_per_step = {method: [] for method in methods}
    blocks_in_trace = {}
    for method in methods:  # warm-up
        h2cache.apply(pipe, method)
        call()
    clock.take()
    for _ in range(reps):  # interleaved rounds: drift hits every method alike
        for method in methods:
            h2cache.apply(pipe, method)
            call()
            seconds, calls = clock.take()
            for part in seconds:
                totals[method]["seconds"][part] += seconds[part]
                totals[method]["calls"][part] += calls[part]
            outside = seconds["transformer"] - seconds["double"] - seconds["single"]
            outside_per_step[method].append(outside / calls["transformer"])
            summary = h2cache.summary(pipe)
            blocks_in_trace[method] = (summary["double_blocks_run"], summary["single_blocks_run"])
    h2cache.remove(pipe)

    out = {}
    for method in methods:
        seconds, calls = totals[method]["seconds"], totals[method]["calls"]
        out[method] = {
            "double_blocks_per_call": calls["double"] / reps,
            "single_blocks_per_call": calls["single"] / reps,
            "blocks_in_trace": list(blocks_in_trace[method]),
            "ms_per_double_block": 1000 * seconds["double"] / calls["double"] if calls["double"] else None,
            "ms_per_single_block": 1000 * seconds["single"] / calls["single"] if calls["single"] else None,
            "ms_outside_blocks_per_step": 1000 * min(outside_per_step[method]),
        }
    return {"image_size": size, "steps": steps, "methods": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7, help="timed calls per configuration (default 7)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels for the overhead part")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of each call in part 3 (default 50)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    for name in ("reps", "size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    results = {
        "threads": torch.get_num_threads(),
        "controller": controller_overhead(args.reps, args.size),
        "pfs": pfs_check_cost(args.reps),
        "methods": method_costs(args.reps, args.size, args.steps),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
