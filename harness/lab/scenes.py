"""The open-caption grammar of the shapes data set: captions that leave most of the picture open.

Why
---
In the closed grammar of ``harness.lab.shapes`` every caption fixes the whole picture, so a model's one-step
prediction of the caption's mean image is already a sharp sample and few-step distillation has nothing
to fix. Stable Diffusion's captions leave most of the picture open: the one-step mean is a blur of many
possible images. This grammar reproduces that situation at 64x64.

The grammar
-----------
``{count} [{size}] [{colour}] {noun} [{position}] [on a {background} background]``, e.g. "two blue
squares on a white background", "a large shape at the top", "three triangles":

- ``count``: "a"/"an" (one), "two", "three"; the noun is plural after two and three;
- ``noun``: circle, square, triangle, or "shape" when the shape is left open;
- every attribute in brackets may be left unsaid. An unsaid attribute is drawn, per object, from its
  whole range: any shape, any size class, any colour but the background's, any place in the picture;
  an unsaid background is any colour but the objects' stated one;
- ``position`` is stated only for a single object: the object's centre lies within ``JITTER`` of the
  anchor ``shapes.ANCHORS`` gives (left, right, top, bottom, centre), moved inward where the object would
  otherwise leave the margin. Unsaid, the centre is anywhere the object fits;
- ``size``: the side of the object's bounding box is drawn uniformly from ``SIDES[size]`` (fractions of
  the image side);
- objects never overlap: their boxes are at least ``GAP`` apart along one axis, and keep ``MARGIN`` from
  the border, so the border is background and every object can be counted.

A caption of the closed grammar ("a small red circle at the top on a blue background") is a caption of
this grammar with every attribute stated; ``parse()`` reads both.

The held-out split
------------------
Evaluation asks for (shape, colour, count) combinations training never shows: ``HELD_OUT`` holds eight,
``(SHAPES[j % 3], COLOUR_NAMES[j], COUNTS[j // 3])`` for j = 0..7, so every colour is held out once and
every shape and count two or three times, with every pair of them still in training. A training
caption never states a held-out combination, and a training picture never shows one (``count`` objects
that all have the held-out shape and colour), whatever its caption says. ``held_out_prompts()`` gives the
64 evaluation captions: each held-out combination with the size unsaid, small or large, and the
background unsaid or named; single objects also with a named position. Most leave the layout open.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

from harness.lab.shapes import (
    ANCHORS,
    COLOUR_NAMES,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SUPERSAMPLING,
    check_resolution,
    draw_object,
)

COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
SIZE_NAMES = ("small", "large")
SIDES = {"small": (0.16, 0.22), "large": (0.32, 0.40)}
MARGIN = 0.05
GAP = 0.06
JITTER = 0.08
# Open attributes of a caption; count and the object noun are always said.
OPEN_ATTRIBUTES = ("shape", "colour", "size", "position", "background")
# How often a training caption states each attribute (position: single objects only).
STATE_PROBABILITY = {"shape": 0.6, "colour": 0.6, "size": 0.5, "position": 0.5, "background": 0.75}
COUNT_WEIGHTS = (0.5, 0.25, 0.25)

HELD_OUT = frozenset((SHAPES[j % 3], COLOUR_NAMES[j], COUNTS[j // 3]) for j in range(8))

_NOUNS: dict[str | None, tuple[str, str]] = {**{shape: (shape, shape + "s") for shape in SHAPES},
                                             None: ("shape", "shapes")}
_CAPTION = re.compile(
    r"(?P<count>an?|two|three) (?:(?P<size>small|large) )?(?:(?P<colour>" + "|".join(COLOUR_NAMES) + r") )?"
    r"(?P<noun>" + "|".join(word for pair in _NOUNS.values() for word in pair) + r")"
    r"(?: (?P<position>" + "|".join(POSITION_PHRASES.values()) + r"))?"
    r"(?: on an? (?P<background>" + "|".join(COLOUR_NAMES) + r") background)?"
)
_COUNT_OF_WORD = {"a": 1, "an": 1, "two": 2, "three": 3}
_POSITION_OF_PHRASE = {phrase: position for position, phrase in POSITION_PHRASES.items()}


@dataclass(frozen=True)
class Caption:
    """What a caption says; None for an attribute it leaves open."""

    count: int
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if self.count not in COUNTS:
            raise ValueError(f"count {self.count} is not one of {COUNTS}")
        for name, allowed in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("size", SIZE_NAMES),
                              ("position", POSITIONS), ("background", COLOUR_NAMES)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.colour is not None and self.colour == self.background:
            raise ValueError(f"the objects and the background are both {self.colour}; they must differ")
        if self.position is not None and self.count != 1:
            raise ValueError("a position is stated for a single object only")

    @property
    def stated(self) -> tuple[str, ...]:
        return tuple(name for name in OPEN_ATTRIBUTES if getattr(self, name) is not None)

    @property
    def open(self) -> tuple[str, ...]:
        """The attributes the caption leaves to chance (the layout of several objects always is)."""
        return tuple(name for name in OPEN_ATTRIBUTES if getattr(self, name) is None)

    @property
    def layout_open(self) -> bool:
        return self.position is None

    def text(self) -> str:
        words = [COUNT_WORDS[self.count]]
        words += [word for word in (self.size, self.colour) if word is not None]
        words.append(_NOUNS[self.shape][self.count > 1])
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        if self.position is not None:
            words.append(POSITION_PHRASES[self.position])
        if self.background is not None:
            words.append(f"on {'an' if self.background[0] in 'aeiou' else 'a'} {self.background} background")
        return " ".join(words)

    def is_held_out(self) -> bool:
        return (self.shape, self.colour, self.count) in HELD_OUT


def parse(text: str) -> Caption:
    """What a caption of this grammar (or of the closed one) says; ValueError for any other text."""
    match = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"{text!r} is not a caption of the shapes grammar, e.g. 'two blue squares on a white "
                         "background' or 'a small red circle at the top on a blue background'")
    count = _COUNT_OF_WORD[match["count"]]
    noun = match["noun"]
    shape = next(name for name, forms in _NOUNS.items() if noun in forms)
    if (count > 1) != (noun == _NOUNS[shape][1]):
        raise ValueError(f"{text!r}: '{match['count']}' needs the {'plural' if count > 1 else 'singular'} "
                         f"'{_NOUNS[shape][count > 1]}'")
    position = _POSITION_OF_PHRASE[match["position"]] if match["position"] else None
    return Caption(count, shape, match["colour"], match["size"], position, match["background"])


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``centre`` and ``side`` are fractions of the image side."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    side: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.side / 2
        return (self.centre[0] - half, self.centre[1] - half, self.centre[0] + half, self.centre[1] + half)

    @property
    def position(self) -> str:
        """The nearest anchor of ``shapes.ANCHORS`` to the centre: what the judge reads back."""
        return nearest_anchor(self.centre)


def nearest_anchor(centre: tuple[float, float]) -> str:
    return min(ANCHORS, key=lambda name: (centre[0] - ANCHORS[name][0]) ** 2 + (centre[1] - ANCHORS[name][1]) ** 2)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]

    def shows_held_out(self) -> bool:
        kinds = {(item.shape, item.colour) for item in self.objects}
        return len(kinds) == 1 and (*kinds.pop(), len(self.objects)) in HELD_OUT


def _apart(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _place(side: float, position: str | None, rng: random.Random) -> tuple[float, float]:
    low, high = MARGIN + side / 2, 1 - MARGIN - side / 2
    if position is None:
        return (rng.uniform(low, high), rng.uniform(low, high))
    return tuple(min(high, max(low, anchor + rng.uniform(-JITTER, JITTER)))  # type: ignore[return-value]
                 for anchor in ANCHORS[position])


def draw_scene(caption: Caption, rng: random.Random, allow_held_out: bool = False) -> Scene:
    """A scene the caption describes, its open attributes drawn from their whole range.

    Unless ``allow_held_out``, a scene that shows a held-out combination is drawn again, and a held-out
    caption (every scene of which shows one) is a ValueError.
    """
    if caption.is_held_out() and not allow_held_out:
        raise ValueError(f"'{caption.text()}' is a held-out combination, which training never draws; "
                         "pass allow_held_out=True to draw it for evaluation")
    while True:
        background = caption.background or rng.choice([c for c in COLOUR_NAMES if c != caption.colour])
        objects: list[ShapeObject] = []
        for _ in range(caption.count):
            for _attempt in range(200):
                size = caption.size or rng.choice(SIZE_NAMES)
                side = rng.uniform(*SIDES[size])
                item = ShapeObject(caption.shape or rng.choice(SHAPES),
                                   caption.colour or rng.choice([c for c in COLOUR_NAMES if c != background]),
                                   size, _place(side, caption.position, rng), side)
                if all(_apart(item.box, other.box) for other in objects):
                    objects.append(item)
                    break
            else:
                break
        scene = Scene(background, tuple(objects))
        if len(objects) == caption.count and (allow_held_out or not scene.shows_held_out()):
            return scene


def sample_caption(rng: random.Random) -> Caption:
    """A training caption: count, then each attribute stated with ``STATE_PROBABILITY``; never held out."""
    while True:
        count = rng.choices(COUNTS, COUNT_WEIGHTS)[0]
        stated = {name: rng.random() < probability for name, probability in STATE_PROBABILITY.items()}
        background = rng.choice(COLOUR_NAMES) if stated["background"] else None
        colour = rng.choice([c for c in COLOUR_NAMES if c != background]) if stated["colour"] else None
        caption = Caption(count, rng.choice(SHAPES) if stated["shape"] else None, colour,
                          rng.choice(SIZE_NAMES) if stated["size"] else None,
                          rng.choice(POSITIONS) if stated["position"] and count == 1 else None, background)
        if not caption.is_held_out():
            return caption


def render_scene(scene: Scene, resolution: int = 64) -> Image.Image:
    """The picture of ``scene``: RGB, anti-aliased by supersampling, the same pixels on every call."""
    check_resolution(resolution)
    side = resolution * SUPERSAMPLING
    image = Image.new("RGB", (side, side), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for item in scene.objects:
        draw_object(draw, item.shape, item.colour, item.box, resolution)
    return image.reduce(SUPERSAMPLING)


def caption_rng(text: str, seed: int) -> random.Random:
    """A generator fixed by a caption and a seed, for reproducible scenes of one caption."""
    return random.Random(zlib.crc32(text.encode()) * 1_000_003 + seed)


def held_out_prompts() -> list[str]:
    """The 64 evaluation captions, built from ``HELD_OUT`` as the module docstring describes."""
    prompts = []
    for shape, colour, count in sorted(HELD_OUT, key=lambda item: COLOUR_NAMES.index(item[1])):
        j = COLOUR_NAMES.index(colour)
        for index, size in enumerate((None, None, "small", "small", "large", "large", None, None)):
            # Odd steps around COLOUR_NAMES: never the objects' own colour.
            background = COLOUR_NAMES[(j + 1 + 2 * index) % 8] if index % 2 or index == 6 and count > 1 else None
            # Single objects: the last two forms name a position.
            position = POSITIONS[(j + index) % 5] if count == 1 and index >= 6 else None
            prompts.append(Caption(count, shape, colour, size, position, background).text())
    return prompts
