"""Check whether a picture shows the attributes its grammar caption names, by pixel statistics only (no learned model).

A caption may name any subset of the attributes ("a red circle"); only the named ones are judged, since the model
is free to draw the others at random.

The grammar (``h2cache/embedded/grammar.py``) draws one flat-coloured shape on a plain background, so a picture
can be read back directly:

* background: the median colour of the outer border, named by the nearest background colour;
* the shape: pixels far from that background colour (at least half as far as the most distant ones, so a blurry
  edge counts half in, half out, as the drawn edge would), keeping the largest 4-connected blob so that stray
  specks do not move the bounding box;
* colour: the median colour of the blob, named by the nearest shape colour;
* size: the bounding-box extent (longer side), nearest of the two drawn extents;
* position: the bounding-box centre (not the centroid, which sits low in a triangle), nearest position centre;
* shape: a triangle if the blob's top quarter is much narrower than its bottom quarter (the grammar's triangle
  points up); otherwise a square or a circle, whichever's fraction of the bounding box (1 or pi/4) the blob's
  fill is nearer to.

CLI: ``python -m eval.checker IMAGE "PROMPT"`` prints one line per attribute and exits 1 if any is wrong.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from PIL import Image
from skimage.measure import label

from h2cache.embedded.grammar import (
    ATTRIBUTES,
    BACKGROUND_COLOURS,
    POSITION_CENTRES,
    SHAPE_COLOURS,
    SIZE_EXTENTS,
    parse_caption,
)

# How much of its bounding box a square and a circle fill; a blurred square (rounded corners) stays nearer 1.
SQUARE_FILL, CIRCLE_FILL = 1.0, math.pi / 4
# Mean width of the top quarter of the shape over that of the bottom quarter: about 1/6 for the drawn triangle,
# 1 for a square, 0.75-1 for a circle; 0.6 leaves room for a triangle tip rounded off by blur.
TRIANGLE_MAX_TAPER = 0.6
BORDER_FRACTION = 1 / 32
# Below this colour distance from the background nothing counts as foreground, so a shape-less noisy picture
# does not get a shape made of its noise.
MIN_FOREGROUND_DISTANCE = 30.0


def _nearest(value, references: dict) -> str:
    return min(references, key=lambda name: float(np.linalg.norm(np.subtract(value, references[name]))))


def read_attributes(image: Image.Image) -> dict[str, str | None]:
    """The value of every grammar attribute ``image`` shows; the shape's attributes are None if it shows no shape."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    border = max(1, round(max(height, width) * BORDER_FRACTION))
    ring = np.ones((height, width), dtype=bool)
    ring[border:-border, border:-border] = False
    background_rgb = np.median(pixels[ring], axis=0)
    seen = dict.fromkeys(ATTRIBUTES)
    seen["background"] = _nearest(background_rgb, BACKGROUND_COLOURS)

    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    # The 99.5th percentile is inside the shape even for the smallest one (a small triangle covers ~3%).
    threshold = max(MIN_FOREGROUND_DISTANCE, 0.5 * np.percentile(distance, 99.5))
    labels = label(distance > threshold, connectivity=1)
    if labels.max() == 0:
        return seen
    blob = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    rows, cols = np.nonzero(blob)
    box_height = rows.max() - rows.min() + 1
    box_width = cols.max() - cols.min() + 1
    centre = ((cols.min() + cols.max() + 1) / 2 / width, (rows.min() + rows.max() + 1) / 2 / height)
    fill_ratio = blob.sum() / (box_height * box_width)
    row_widths = blob[rows.min() : rows.max() + 1].sum(axis=1)
    quarter = max(1, box_height // 4)
    taper = row_widths[:quarter].mean() / row_widths[-quarter:].mean()
    extent = max(box_height / height, box_width / width)
    seen["size"] = min(SIZE_EXTENTS, key=lambda name: abs(SIZE_EXTENTS[name] - extent))
    seen["colour"] = _nearest(np.median(pixels[blob], axis=0), SHAPE_COLOURS)
    if taper < TRIANGLE_MAX_TAPER:
        seen["shape"] = "triangle"
    else:
        seen["shape"] = "square" if fill_ratio > (SQUARE_FILL + CIRCLE_FILL) / 2 else "circle"
    seen["position"] = _nearest(centre, POSITION_CENTRES)
    return seen


def check(image: Image.Image, prompt: str) -> dict[str, bool]:
    """For every attribute the prompt names, whether ``image`` shows it."""
    seen = read_attributes(image)
    return {attribute: seen[attribute] == value for attribute, value in parse_caption(prompt).named().items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print('usage: python -m eval.checker IMAGE "PROMPT"', file=sys.stderr)
        return 2
    image_path, prompt = argv
    image = Image.open(image_path)
    asked = parse_caption(prompt)
    seen = read_attributes(image)
    verdict = check(image, prompt)
    for attribute in ATTRIBUTES:
        if attribute in verdict:
            verdict_word = "ok" if verdict[attribute] else "WRONG"
            asked_word = getattr(asked, attribute)
        else:
            verdict_word, asked_word = "(not named)", "-"
        print(f"{attribute:<10} asked {asked_word:<8} seen {seen[attribute] or '-':<8} {verdict_word}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
