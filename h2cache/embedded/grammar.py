"""A procedural captioned dataset: one flat-coloured shape on a plain background, rendered from a tiny grammar.

The embedded model is trained on these pictures, and ``eval/checker.py`` verifies generated pictures against the
same definitions, so everything a caption can say is defined here once.

Grammar (every attribute is optional; 1,728 distinct captions, 450 of them naming all five attributes)::

    caption    := "a" [SIZE] [COLOUR] (SHAPE | "shape") [POSITION] ["against a" BACKGROUND "background"]
    SIZE       := "small" | "large"                       shape extent 16 or 26 px at 64 px (scaled with the image)
    COLOUR     := "red" | "green" | "blue" | "yellow" | "purple"
    SHAPE      := "circle" | "square" | "triangle"        the triangle points up
    POSITION   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
    BACKGROUND := "white" | "black" | "gray"

e.g. "a small red circle on the left against a white background", "a red circle", "a square at the top", "a shape".
An attribute the caption leaves out is drawn at random: the model learns the whole conditional distribution, as
people write prompts (a partial training caption names each attribute with probability ``1 - ATTRIBUTE_DROPOUT``;
``train.py`` says when training uses partial captions).

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
from functools import lru_cache
from itertools import product

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
# Probability that a partial training caption leaves an attribute out (each independently): every subset is equally
# likely, so half of them name two attributes or fewer, as people's prompts do (``train.py`` has what 0.3 cost).
ATTRIBUTE_DROPOUT = 0.5
UNNAMED_SHAPE_WORD = "shape"


def _words(*phrases) -> list[str]:
    out = []
    for phrase in phrases:
        for word in phrase.split():
            if word not in out:
                out.append(word)
    return out


# Every word a caption can contain, in a fixed order (the tokenizer's ids follow it).
VOCABULARY = tuple(
    _words(
        "a against background",
        UNNAMED_SHAPE_WORD,
        *SIZES,
        *SHAPE_COLOURS,
        *SHAPES,
        *POSITION_PHRASES.values(),
        *BACKGROUND_COLOURS,
    )
)


@dataclass(frozen=True)
class Scene:
    """What a caption asks for: a value per attribute, or None where the caption leaves the attribute out."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    background: str | None = None

    def caption(self) -> str:
        words = ["a", self.size, self.colour, self.shape or UNNAMED_SHAPE_WORD]
        if self.position:
            words.append(POSITION_PHRASES[self.position])
        if self.background:
            words.append(f"against a {self.background} background")
        return " ".join(word for word in words if word)

    def named(self) -> dict[str, str]:
        """The attributes the caption names, with their values."""
        return {attribute: getattr(self, attribute) for attribute in ATTRIBUTES if getattr(self, attribute)}

    def is_complete(self) -> bool:
        return len(self.named()) == len(ATTRIBUTES)


_VALUES = {
    "size": SIZES,
    "colour": tuple(SHAPE_COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITION_PHRASES),
    "background": tuple(BACKGROUND_COLOURS),
}


def all_scenes() -> list[Scene]:
    """Every complete scene (all five attributes named), in a fixed order: what ``render`` can draw."""
    return [Scene(*values) for values in product(*(_VALUES[attribute] for attribute in ATTRIBUTES))]


def all_descriptions() -> list[Scene]:
    """Every scene a caption can describe, partial ones included, in a fixed order."""
    return [Scene(*values) for values in product(*((None, *_VALUES[attribute]) for attribute in ATTRIBUTES))]


@lru_cache(maxsize=1)
def _descriptions_by_caption() -> dict[str, Scene]:
    return {scene.caption(): scene for scene in all_descriptions()}


def parse_caption(caption: str) -> Scene:
    """The scene a grammar caption describes; ``ValueError`` for text outside the grammar."""
    try:
        return _descriptions_by_caption()[" ".join(caption.lower().split())]
    except KeyError:
        raise ValueError(f"not a caption of the embedded grammar: {caption!r}") from None


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` the embedded model never saw in training, in order of first appearance."""
    known = set(VOCABULARY)
    return list(dict.fromkeys(word for word in prompt.lower().split() if word not in known))


def random_scene(rng: np.random.Generator) -> Scene:
    """A complete scene with every attribute drawn uniformly."""
    return Scene(*(values[rng.integers(len(values))] for values in (_VALUES[a] for a in ATTRIBUTES)))


def random_description(scene: Scene, rng: np.random.Generator, dropout: float = ATTRIBUTE_DROPOUT) -> Scene:
    """``scene`` with each attribute left out independently with probability ``dropout``."""
    leave_out = rng.random(len(ATTRIBUTES)) < dropout
    return Scene(*(None if drop else getattr(scene, a) for a, drop in zip(ATTRIBUTES, leave_out, strict=True)))


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB picture; ``rng`` adds the jitter (None draws it exactly)."""
    if not scene.is_complete():
        raise ValueError(f"render needs a complete scene, got {scene}")
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


def sample(rng: np.random.Generator, size: int = 64, dropout: float = 0.0) -> tuple[Image.Image, str]:
    """One training pair drawn from ``rng``: the picture of a complete scene and a caption that names each of its
    attributes with probability ``1 - dropout``."""
    scene = random_scene(rng)
    return render(scene, size, rng), random_description(scene, rng, dropout).caption()
