"""Measure whether the embedded model draws what the grammar asks for, and save a grid of its samples.

    python -m h2cache.embedded.evaluate [--folder h2cache/embedded/tiny-flux] [--count 100]

Draws ``count`` grammar captions (from a prompt seed of its own) and samples each with a fresh generation seed
(training derives its noise from small seeds through a different formula, so these seeds were never trained on), at
the folder's default step count, guidance and native size. Prints, per attribute, the fraction of images in which
``eval/checker.py`` finds it, the fraction with every attribute right, and the seconds per image; writes the
samples as a grid to ``assets/embedded_samples.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.checker import check

from . import SHIPPED_FOLDER, load_folder
from .grammar import ATTRIBUTES, random_scene

PROMPT_SEED = 20_261_122
FIRST_GENERATION_SEED = 7_000_000
GRID_PATH = Path(__file__).resolve().parents[2] / "assets" / "embedded_samples.png"


def generate(pipe, prompt: str, seed: int) -> Image.Image:
    """One picture at the folder's call defaults (native size, steps, guidance, sequence length)."""
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **pipe.h2cache_call_defaults).images[0]


def evaluate(folder: Path, count: int) -> tuple[dict, list[Image.Image]]:
    pipe = load_folder(folder)
    rng = np.random.default_rng(PROMPT_SEED)
    prompts = [random_scene(rng).caption() for _ in range(count)]
    generate(pipe, prompts[0], FIRST_GENERATION_SEED)  # warm-up: the first call pays one-off allocation costs
    images, verdicts = [], []
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        image = generate(pipe, prompt, FIRST_GENERATION_SEED + index)
        images.append(image)
        verdicts.append(check(image, prompt))
    seconds_per_image = (time.perf_counter() - started) / count
    report = {
        "images": count,
        "accuracy": {attribute: float(np.mean([v[attribute] for v in verdicts])) for attribute in ATTRIBUTES},
        "all_attributes": float(np.mean([all(v.values()) for v in verdicts])),
        "seconds_per_image": seconds_per_image,
        "call_defaults": pipe.h2cache_call_defaults,
    }
    return report, images


def save_grid(images: list[Image.Image], path: Path, columns: int = 10):
    side = images[0].width
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * side, rows * side), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * side, (index // columns) * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=SHIPPED_FOLDER)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--grid", type=Path, default=GRID_PATH)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report, images = evaluate(args.folder, args.count)
    save_grid(images, args.grid)
    print(json.dumps(report, indent=2))
    print(f"grid of samples written to {args.grid}")


if __name__ == "__main__":
    main()
