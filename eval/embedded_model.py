"""Measure whether the embedded model draws what the grammar asks for, and save a grid of its samples.

    python -m eval.embedded_model [--folder h2cache/embedded/tiny-flux] [--count 100] [--steps N] [--validation]

Draws ``count`` grammar captions (from a prompt seed of its own; half name all five attributes, half a random
subset, as people write) and samples each with a fresh generation seed (training derives its noise from small seeds
through a different formula, so these seeds were never trained on) by a plain ``pipe(prompt, generator=...)`` call:
the folder's default steps (or ``--steps``), guidance and native size. Prints, per attribute, the fraction of the
images whose caption names it in which ``eval/checker.py`` finds it (overall, and for the full and the partial half
apart), the fraction with every named attribute right (overall and by the number of attributes named), the seconds
per image, how evenly the blocks work (``block_activity``), and what the folder's autoencoder alone keeps of true
pictures (``autoencoder_round_trip``: the ceiling no flow model on that decoder can pass); writes the samples as a
grid to ``assets/embedded_samples.png`` (``--grid`` elsewhere).

``--validation`` draws another set (its own prompt seed and generation seeds) and writes no grid unless ``--grid``
is given. Choose recipes and sampling settings on it: the evaluation set's figures are the ones reported, and they
stay a measurement only while nothing is chosen by them.
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
from h2cache.embedded import SHIPPED_FOLDER, load_folder
from h2cache.embedded.grammar import ATTRIBUTES, random_description, random_scene, render

PROMPT_SEED = 20_261_122
FIRST_GENERATION_SEED = 7_000_000
VALIDATION_PROMPT_SEED = 31_415_926
VALIDATION_FIRST_GENERATION_SEED = 9_000_000
GRID_PATH = Path(__file__).resolve().parents[1] / "assets" / "embedded_samples.png"


def generate(pipe, prompt: str, seed: int, **call) -> Image.Image:
    """One picture from a plain call: the model's own defaults (native size, steps, guidance, sequence length)."""
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **call).images[0]


def evaluation_prompts(count: int, prompt_seed: int = PROMPT_SEED) -> list[str]:
    """``count`` captions: even indices name every attribute, odd ones a random subset (possibly none)."""
    rng = np.random.default_rng(prompt_seed)
    prompts = []
    for index in range(count):
        scene = random_scene(rng)
        prompts.append(scene.caption() if index % 2 == 0 else random_description(scene, rng, dropout=0.5).caption())
    return prompts


def _accuracy(verdicts: list[dict]) -> dict:
    """Per attribute, the fraction of the verdicts naming it that found it (None where no caption names it)."""
    found = {attribute: [v[attribute] for v in verdicts if attribute in v] for attribute in ATTRIBUTES}
    return {attribute: float(np.mean(values)) if values else None for attribute, values in found.items()}


def _by_named_count(verdicts: list[dict]) -> dict[int, dict]:
    """Per number of attributes a caption names: how many images, the share with every named attribute right, and
    the share whose named shape was found. Captions naming little are the hard case (the picture's other attributes
    are the model's own choice), and an overall figure hides them behind the full captions."""
    counts = sorted({len(v) for v in verdicts})
    out = {}
    for count in counts:
        group = [v for v in verdicts if len(v) == count]
        shapes = [v["shape"] for v in group if "shape" in v]
        out[count] = {
            "images": len(group),
            "all_named_attributes": float(np.mean([all(v.values()) for v in group])),
            "shape": float(np.mean(shapes)) if shapes else None,
        }
    return out


def autoencoder_round_trip(pipe, count: int, batch: int = 16) -> dict:
    """The checker's accuracy per attribute on ``count`` true grammar pictures (full captions) after the folder's
    VAE encodes and decodes them, and the share with every attribute right. A flow model can at best hand the
    decoder the exact latent of a true picture, so this bounds what any model on this autoencoder can score; it is
    how a lost shape is told apart as the decoder's (small squares' corners rounded into circles) or the model's."""
    rng = np.random.default_rng(PROMPT_SEED + 1)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    verdicts = []
    for start in range(0, count, batch):
        scenes = [random_scene(rng) for _ in range(min(batch, count - start))]
        pixels = pipe.image_processor.preprocess([render(scene, size, rng) for scene in scenes])
        with torch.no_grad():
            decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
        for scene, image in zip(scenes, pipe.image_processor.postprocess(decoded, output_type="pil"), strict=True):
            verdicts.append(check(image, scene.caption()))
    return {**_accuracy(verdicts), "all": float(np.mean([all(v.values()) for v in verdicts]))}


def block_activity(pipe, prompts: list[str], steps: int = 10) -> dict[str, list[float]]:
    """Per stage, how much each block changes the image stream: ``||out - in|| / ||in||``, the mean over the steps
    of one seeded call per prompt. In FLUX.1 every block works; a block near 0 is idle, and a cache would skip it
    for free, so cache measurements on such a model would flatter every method."""
    stages = {"double": pipe.transformer.transformer_blocks, "single": pipe.transformer.single_transformer_blocks}
    changes = {stage: [[] for _ in blocks] for stage, blocks in stages.items()}

    def record(stage, index):
        def hook(module, args, kwargs, output):
            before = kwargs["hidden_states"]
            after = output[1]  # diffusers' FLUX blocks return (text stream, image stream)
            changes[stage][index].append(((after - before).norm() / before.norm()).item())

        return hook

    handles = [
        block.register_forward_hook(record(stage, index), with_kwargs=True)
        for stage, blocks in stages.items()
        for index, block in enumerate(blocks)
    ]
    try:
        for index, prompt in enumerate(prompts):
            generate(pipe, prompt, FIRST_GENERATION_SEED + index, num_inference_steps=steps)
    finally:
        for handle in handles:
            handle.remove()
    return {stage: [float(np.mean(values)) for values in per_block] for stage, per_block in changes.items()}


def evaluate(
    folder: Path, count: int, steps: int | None = None, validation: bool = False
) -> tuple[dict, list[Image.Image]]:
    pipe = load_folder(folder)
    call = {} if steps is None else {"num_inference_steps": steps}
    if validation:
        prompts, first_seed = evaluation_prompts(count, VALIDATION_PROMPT_SEED), VALIDATION_FIRST_GENERATION_SEED
    else:
        prompts, first_seed = evaluation_prompts(count), FIRST_GENERATION_SEED
    generate(pipe, prompts[0], first_seed, **call)  # warm-up: the first call pays one-off allocation costs
    images, verdicts, seconds = [], [], 0.0
    for index, prompt in enumerate(prompts):
        started = time.perf_counter()
        image = generate(pipe, prompt, first_seed + index, **call)
        seconds += time.perf_counter() - started
        images.append(image)
        verdicts.append(check(image, prompt))
    seconds_per_image = seconds / count
    report = {
        "set": "validation" if validation else "evaluation",
        "images": count,
        "accuracy": _accuracy(verdicts),
        "accuracy_full_captions": _accuracy(verdicts[0::2]),
        "accuracy_partial_captions": _accuracy(verdicts[1::2]),
        "named": {attribute: sum(attribute in v for v in verdicts) for attribute in ATTRIBUTES},
        "all_named_attributes": float(np.mean([all(v.values()) for v in verdicts])),
        "by_named_count": _by_named_count(verdicts),
        "seconds_per_image": seconds_per_image,
        # Per stage, the least active block's change relative to the stage's mean (FLUX.1-like: well above 0).
        "block_activity": {
            stage: min(values) / float(np.mean(values)) for stage, values in block_activity(pipe, prompts[:2]).items()
        },
        "autoencoder_round_trip": autoencoder_round_trip(pipe, count),
        "call": dict(pipe.h2cache_call_defaults, **call),
    }
    return report, images


def save_grid(images: list[Image.Image], path: Path, columns: int = 10):
    side = images[0].width
    columns = min(columns, len(images))
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
    parser.add_argument("--grid", type=Path, default=None, help=f"default: {GRID_PATH} (none with --validation)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the folder's own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation", action="store_true", help="the set to choose settings on (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report, images = evaluate(args.folder, args.count, args.steps, args.validation)
    print(json.dumps(report, indent=2))
    grid = args.grid or (None if args.validation else GRID_PATH)
    if grid is not None:
        save_grid(images, grid)
        print(f"grid of samples written to {grid}")


if __name__ == "__main__":
    main()
