"""A procedural captioned dataset: one flat-coloured shape on a plain background, rendered from a tiny grammar.

The embedded model is trained on these pictures, and ``eval/checker.py`` verifies generated pictures against the
same definitions, so everything a caption can say is defined here once.

Grammar (every caption has exactly this form, 450 distinct captions)::

    caption    := "a" SIZE COLOUR SHAPE POSITION "against a" BACKGROUND "background"
    SIZE       := "small" | "large"                       shape extent 16 or 26 px at 64 px (scaled with the image)
    COLOUR     := "red" | "green" | "blue" | "yellow" | "purple"
    SHAPE      := "circle" | "square" | "triangle"        the triangle points up
    POSITION   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    BACKGROUND := "white" | "black" | "gray"

e.g. "a small red circle on the left against a white background".

Why this design:

* Shape colours and background colours are disjoint word sets. FluxPipeline gives every text token the same
  position id, so the transformer sees the prompt almost as a bag of words; disjoint sets mean "red" can only mean
  the shape and "white" only the background, and no word-order binding has to be learned.
* Every attribute is measurable by pixel statistics alone (background = border colour, shape colour = foreground
  colour, size = bounding-box extent, position = bounding-box centre, shape = how much of its bounding box the shape
  fills: square 1.0, circle pi/4, triangle 1/2), so the checker needs no learned model.
* Colours are far apart in RGB (the closest shape/background pair, purple on gray, is ~100 apart) so a blurry
  64 px sample is still unambiguous.

Pictures are drawn at 4x and downsampled, giving anti-aliased edges like a real image. Each sample jitters the
centre by up to 2 px and the extent by up to 2 px (at 64 px), so the model learns a distribution, not 450 templates;
the jitter is far below the gaps between attribute values, so a caption stays true of every render.
Everything comes from a seed; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZES = ("small", "large")
SHAPE_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
BACKGROUND_COLOURS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}

# Geometry as fractions of the image side, so the grammar means the same thing at any resolution.
# Shape centre (x, y) per position: a quarter of the way in from the named edge (a bit more, so a large shape
# with jitter still fits inside the picture).
POSITION_CENTRES = {
    "left": (17 / 64, 0.5),
    "right": (47 / 64, 0.5),
    "top": (0.5, 17 / 64),
    "bottom": (0.5, 47 / 64),
    "center": (0.5, 0.5),
}
SIZE_EXTENTS = {"small": 16 / 64, "large": 26 / 64}
CENTRE_JITTER = 2 / 64
EXTENT_JITTER = 2 / 64
SUPERSAMPLING = 4

ATTRIBUTES = ("size", "colour", "shape", "position", "background")


def _words(*phrases) -> list[str]:
    out = []
    for phrase in phrases:
        for word in phrase.split():
            if word not in out:
                out.append(word)
    return out


# Every word a caption can contain, in a fixed order (the tokenizer's ids follow it).
VOCABULARY = tuple(
    _words("a against background", *SIZES, *SHAPE_COLOURS, *SHAPES, *POSITION_PHRASES.values(), *BACKGROUND_COLOURS)
)


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: one value of every attribute."""

    size: str
    colour: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]} "
            f"against a {self.background} background"
        )


def all_scenes() -> list[Scene]:
    """Every scene the grammar can describe, in a fixed order."""
    return [
        Scene(size, colour, shape, position, background)
        for size in SIZES
        for colour in SHAPE_COLOURS
        for shape in SHAPES
        for position in POSITION_PHRASES
        for background in BACKGROUND_COLOURS
    ]


def parse_caption(caption: str) -> Scene:
    """The scene a grammar caption describes; ``ValueError`` for text outside the grammar."""
    for scene in all_scenes():
        if scene.caption() == " ".join(caption.lower().split()):
            return scene
    raise ValueError(f"not a caption of the embedded grammar: {caption!r}")


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        size=SIZES[rng.integers(len(SIZES))],
        colour=tuple(SHAPE_COLOURS)[rng.integers(len(SHAPE_COLOURS))],
        shape=SHAPES[rng.integers(len(SHAPES))],
        position=tuple(POSITION_PHRASES)[rng.integers(len(POSITION_PHRASES))],
        background=tuple(BACKGROUND_COLOURS)[rng.integers(len(BACKGROUND_COLOURS))],
    )


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB picture; ``rng`` adds the jitter (None draws it exactly)."""
    centre_x, centre_y = POSITION_CENTRES[scene.position]
    extent = SIZE_EXTENTS[scene.size]
    if rng is not None:
        centre_x += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        centre_y += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        extent += rng.uniform(-EXTENT_JITTER, EXTENT_JITTER)
    canvas = size * SUPERSAMPLING
    image = Image.new("RGB", (canvas, canvas), BACKGROUND_COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, half = centre_x * canvas, centre_y * canvas, extent * canvas / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = SHAPE_COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def sample(rng: np.random.Generator, size: int = 64) -> tuple[Image.Image, str]:
    """One training pair (picture, caption) drawn from ``rng``."""
    scene = random_scene(rng)
    return render(scene, size, rng), scene.caption()
