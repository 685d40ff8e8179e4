"""A synthetic captioned data set: one coloured shape on a plain background, and the grammar of its captions.

The grammar
-----------
Every caption reads ``a {size} {colour} {shape} {position} on a {background} background`` ("an" before
"orange"), e.g. "a small red circle at the top on a blue background":

- ``shape``: circle, square, triangle (apex up);
- ``colour`` and ``background``: one of the eight named colours in ``COLOURS`` (red, orange, yellow,
  green, blue, purple, white, black), never the same one twice in a caption;
- ``position``: left, right, top, bottom, centre, written "on the left", "on the right", "at the top",
  "at the bottom", "in the centre": the shape's bounding box is centred on the anchor ``ANCHORS`` gives,
  as fractions of the image side;
- ``size``: small or large: the bounding box's side is ``SIZES`` times the image side (its edges rounded
  to whole pixels).

That makes 3 x 8 x 7 x 5 x 2 = 1,680 captions (``all_attributes()``), each with exactly one picture
(``render()``), drawn at four times the resolution and reduced so that edges are anti-aliased.

The held-out split
------------------
Evaluation asks for attribute combinations the training data never shows. The held-out (shape, colour,
position) triples are ``(SHAPES[j % 3], COLOUR_NAMES[j % 8], POSITIONS[j % 5])`` for j = 0..15: as 3, 8
and 5 are coprime these are 16 distinct triples, every colour is held out with two shapes and two
positions, and every shape, colour, position and each pair of them still occurs in training.
``sample_attributes()`` and therefore ``write_dataset()`` never emit a held-out triple, whatever the size
and background. ``held_out_prompts()`` gives the 64 evaluation prompts: each held-out triple in both
sizes on two backgrounds an odd number of steps around ``COLOUR_NAMES`` (1 and 5 for j < 8, 3 and 7
after), so every background occurs eight times.

``harness.lab.judge`` reads these attributes back from pixels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from itertools import product

from PIL import Image, ImageDraw

from harness.errors import HarnessError

SHAPES = ("circle", "square", "triangle")
# Saturated and far apart in RGB (the closest pair, orange and yellow, is 94 apart), so that a blurred,
# noisy or model-drawn colour still has one clear nearest name.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (245, 225, 40),
    "green": (40, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
# Centre of the shape's bounding box, (x, y) as fractions of the image side.
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
           "centre": (0.5, 0.5)}
# Side of the bounding box as a fraction of the image side; a large shape at an edge anchor still keeps
# 5% of the image as margin, so the border stays background.
SIZES = {"small": 0.2, "large": 0.4}
SIZE_NAMES = tuple(SIZES)

SUPERSAMPLING = 4
MIN_RESOLUTION = 32
# Drawn SUPERSAMPLING times larger: 2048 is an 8192x8192 canvas (200 MB), and no SD model is trained larger.
MAX_RESOLUTION = 2048

_CAPTION = re.compile(
    rf"a ({'|'.join(SIZE_NAMES)}) ({'|'.join(COLOUR_NAMES)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(POSITION_PHRASES.values())}) on an? ({'|'.join(COLOUR_NAMES)}) background"
)
_POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class ShapeAttributes:
    """What one caption says and one picture shows."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("background", COLOUR_NAMES),
                              ("position", POSITIONS), ("size", SIZE_NAMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}; they must differ")


ATTRIBUTE_NAMES = tuple(field.name for field in fields(ShapeAttributes))


def caption(attrs: ShapeAttributes) -> str:
    """The caption of ``attrs``, e.g. "a small red circle at the top on a blue background"."""
    article = "an" if attrs.background[0] in "aeiou" else "a"
    return (f"a {attrs.size} {attrs.colour} {attrs.shape} {POSITION_PHRASES[attrs.position]} "
            f"on {article} {attrs.background} background")


def parse_caption(text: str) -> ShapeAttributes:
    """The attributes a caption of the grammar names; ValueError for any other text.

    Case and extra whitespace are ignored, and so is "a" for "an" ("on a orange background").
    """
    match = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"{text!r} is not a caption of the shapes grammar, "
                         "e.g. 'a small red circle at the top on a blue background'")
    size, colour, shape, phrase, background = match.groups()
    return ShapeAttributes(shape, colour, background, _POSITION_OF_PHRASE[phrase], size)


def all_attributes() -> list[ShapeAttributes]:
    """Every combination the grammar allows, in a fixed order."""
    return [ShapeAttributes(shape, colour, background, position, size)
            for shape, colour, background, position, size
            in product(SHAPES, COLOUR_NAMES, COLOUR_NAMES, POSITIONS, SIZE_NAMES) if colour != background]


HELD_OUT_TRIPLES = frozenset((SHAPES[j % 3], COLOUR_NAMES[j % 8], POSITIONS[j % 5]) for j in range(16))


def is_held_out(attrs: ShapeAttributes) -> bool:
    """True if ``attrs`` has a held-out (shape, colour, position) triple: never in training data."""
    return (attrs.shape, attrs.colour, attrs.position) in HELD_OUT_TRIPLES


def held_out_prompts() -> list[str]:
    """The 64 evaluation captions, built from the held-out triples as the module docstring describes."""
    prompts = []
    for j in range(16):
        colour = j % 8
        offsets = (1, 5) if j < 8 else (3, 7)
        for offset, size in product(offsets, SIZE_NAMES):
            background = COLOUR_NAMES[(colour + offset) % 8]
            prompts.append(caption(ShapeAttributes(SHAPES[j % 3], COLOUR_NAMES[colour], background,
                                                   POSITIONS[j % 5], size)))
    return prompts


def sample_attributes(rng: random.Random) -> ShapeAttributes:
    """A uniformly drawn combination that is not held out."""
    while True:
        colour, background = rng.sample(COLOUR_NAMES, 2)
        attrs = ShapeAttributes(rng.choice(SHAPES), colour, background, rng.choice(POSITIONS),
                                rng.choice(SIZE_NAMES))
        if not is_held_out(attrs):
            return attrs


def check_resolution(resolution: int) -> None:
    """HarnessError unless ``resolution`` suits both the renderer and SD's 8x latent downsampling."""
    if resolution < MIN_RESOLUTION or resolution % 8:
        raise HarnessError(f"--resolution {resolution} must be a multiple of 8 and at least {MIN_RESOLUTION}; "
                           "pick e.g. 64.")
    if resolution > MAX_RESOLUTION:
        raise HarnessError(f"--resolution {resolution} is larger than {MAX_RESOLUTION}, the largest harness draws; "
                           "pick e.g. 64.")


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, box: tuple[float, float, float, float],
                resolution: int) -> None:
    """Draw one shape on a ``SUPERSAMPLING`` times larger canvas; ``box`` is (left, top, right, bottom) as
    fractions of the image side."""
    # The box's edges are rounded to whole pixels of the final image, so that a square's sides are sharp
    # and a blurred edge is centred where the judge's halfway threshold expects it.
    left, top, right, bottom = (round(fraction * resolution) * SUPERSAMPLING for fraction in box)
    # PIL's shapes include their end coordinates: the last supersampled pixel inside the box is one less.
    right, bottom = right - 1, bottom - 1
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon((((left + right) / 2, top), (right, bottom), (left, bottom)), fill=fill)


def render(attrs: ShapeAttributes, resolution: int = 64) -> Image.Image:
    """The picture of ``attrs``: an RGB image, the same pixels on every call."""
    check_resolution(resolution)
    anchor_x, anchor_y = ANCHORS[attrs.position]
    half = SIZES[attrs.size] / 2
    side = resolution * SUPERSAMPLING
    image = Image.new("RGB", (side, side), COLOURS[attrs.background])
    draw_object(ImageDraw.Draw(image), attrs.shape, attrs.colour,
                (anchor_x - half, anchor_y - half, anchor_x + half, anchor_y + half), resolution)
    return image.reduce(SUPERSAMPLING)
