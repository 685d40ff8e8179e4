"""The prompt-fidelity judge: does a picture show what its shapes caption says, and commit to one picture?

It reads a picture back from pixels, with no model, the same way every time (``read()``):

1. background: named by the palette colour nearest to the per-channel median of the outermost ring of
   pixels (objects keep a margin, so the border is background); its colour as drawn is the median of the
   inner pixels nearest to that palette colour (a decoder's padding tints the outermost pixels, and its
   colours drift);
2. ink: pixels farther than ``MIN_CONTRAST`` from the background, outside the outermost ``BORDER_BAND``
   (which never holds an object);
3. objects: 4-connected regions of *solid* ink - pixels whose distance to their nearest palette colour
   of ``shapes.COLOURS`` is under ``SOLID_SHARE`` of that colour's distance to the background as drawn
   (a decoder's drift keeps a colour solid; a ghost, a mix with the background, is not) - of one colour
   and at least ``MIN_OBJECT_AREA`` of the picture. Each grows to every connected pixel nearer to its
   colour than to the background (a halfway threshold, so blur moves no edge), and is read like a render:
   - position: the anchor of ``shapes.ANCHORS`` nearest to the centre of its bounding box;
   - size: large when the box's longer side exceeds ``LARGE_ABOVE`` of the image side;
   - shape: a triangle (apex up) when less than ``TRIANGLE_BELOW`` of it lies in the upper half of its
     box; otherwise a square when it is more than ``SQUARE_ABOVE`` times as wide along the diagonals as
     along the axes (a square is sqrt(2) times, a circle once), else a circle;
   - colour: the palette colour its solid pixels are nearest to;
4. solidity: the share of ink within ``EDGE_PIXELS`` of an object. A render's ink is all objects; a smear,
   or the ghost of several layouts averaged, is ink that belongs to no solid object.

``judge()`` scores one picture against its caption (``harness.lab.scenes`` grammar, which includes the closed
one of ``harness.lab.shapes``):

- each attribute the caption states: background right or not; shape, colour, size and position as the
  share of the objects that show it (no object: 0);
- **commitment**: the picture shows exactly the stated number of objects, its solidity is at least
  ``SOLID_MIN``, and its background is a palette colour (within ``BACKGROUND_TOLERANCE``), not a mix;
- ``overall`` = half commitment, half the mean of the stated attributes' scores (commitment alone when
  the caption states none). A picture that does not commit to one image - a smear, or the mean of layouts
  that lie further apart than an object's edge - scores at most 0.5. (Layouts of a caption that names a
  position differ by a few pixels of jitter: their mean is still nearly one picture.)

``coverage()`` judges a sampler's pictures of the same captions across seeds: for each attribute a
caption leaves open, the joint histogram of the values two pictures of one caption show, over every pair
of seeds, against the same for pairs of independent scenes the data draws for those captions
(``scenes.draw_scene``); coverage is one minus the mean total-variation distance. A sampler that draws
the same layout for every seed, one that always draws the same place, and one that draws no object all
lose.

Thresholds are fixed by ``tests/test_judge.py`` (clean, blurred and noisy renders; averaged layouts;
shuffled captions), never by how well some model scores.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations
from typing import Any

import numpy as np
from PIL import Image

from harness.lab import scenes
from harness.lab.shapes import COLOURS

_PALETTE = np.array(list(COLOURS.values()), dtype=float)
_PALETTE_NAMES = list(COLOURS)
# Halfway between the largest small side and the smallest large side.
LARGE_ABOVE = (scenes.SIDES["small"][1] + scenes.SIDES["large"][0]) / 2
# An apex-up triangle has a quarter of its area in the upper half of its box, a circle or square half.
TRIANGLE_BELOW = (0.25 + 0.5) / 2
# A circle is as wide along its diagonals as along its axes, a square sqrt(2) times as wide.
SQUARE_ABOVE = (1.0 + np.sqrt(2)) / 2
# Below this RGB distance from the background a pixel is background. The closest two named colours are
# 94 apart; the 99th percentile of noise with sigma 8 per channel is 27.
MIN_CONTRAST = 40.0
# A pixel is solid when it lies within this share of the way from its nearest palette colour to the
# background: a layout ghost (1/8 to 3/8 of the colour) or an anti-aliased edge is not.
SOLID_SHARE = 0.4
# The smallest object (a small triangle) covers about 1.3% of the picture; specks below this are none.
MIN_OBJECT_AREA = 0.004
EDGE_PIXELS = 3
# The outermost band that never holds an object: scenes.MARGIN, as a fraction of the side. A decoder's
# padding draws a ring of off-colour pixels about that wide.
BORDER_BAND = scenes.MARGIN
SOLID_MIN = 0.9
# A background drawn farther than this from its palette colour is a mix, not a background: three quarters
# of the closest two palette colours' distance (94), above a decoder's drift (about 45 RGB).
BACKGROUND_TOLERANCE = 70.0
REFERENCE_DRAWS = 32
PER_OBJECT = ("shape", "colour", "size", "position")
MISSING = "none"


@dataclass(frozen=True)
class SeenObject:
    shape: str
    colour: str
    size: str
    position: str
    area: int


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one picture."""

    background: str
    objects: tuple[SeenObject, ...]  # largest first
    solidity: float
    background_drift: float = 0.0  # RGB distance of the background as drawn from its palette colour


def _components(labels: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected regions of equal non-negative label, largest first."""
    height, width = labels.shape
    grid = labels.tolist()  # Python lists index far faster than numpy arrays one pixel at a time
    seen = [[False] * width for _ in range(height)]
    regions = []
    for start_y, start_x in zip(*np.nonzero(labels >= 0)):
        if seen[start_y][start_x]:
            continue
        label = grid[start_y][start_x]
        seen[start_y][start_x] = True
        region, stack = [], [(int(start_y), int(start_x))]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and not seen[ny][nx] and grid[ny][nx] == label:
                    seen[ny][nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    return sorted(regions, key=len, reverse=True)


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    out: np.ndarray = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _read_object(region: np.ndarray, colour: str, area: int) -> SeenObject:
    height, width = region.shape
    ys, xs = np.nonzero(region)
    box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    centre_x, centre_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    position = scenes.nearest_anchor((centre_x / width, centre_y / height))
    size = "large" if max(box_width / width, box_height / height) > LARGE_ABOVE else "small"
    upper_share = float(np.mean(ys + 0.5 < centre_y))
    # Along the diagonals a pixel spans sqrt(2), so a box of whole pixels measures sqrt(2) times its side.
    diagonal = np.mean([np.ptp(xs + ys), np.ptp(xs - ys)]) / np.sqrt(2) + np.sqrt(2)
    corners = diagonal / np.mean([box_width, box_height])
    shape = "triangle" if upper_share < TRIANGLE_BELOW else "square" if corners > SQUARE_ABOVE else "circle"
    return SeenObject(shape, colour, size, position, area)


def read(image: Image.Image) -> Reading:
    """The background, the solid objects and the solidity of ``image``."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    # The border's median names the background. Its colour as drawn is the median of the inner pixels nearest
    # to that palette colour: a decoder's padding tints the outermost pixels, and its colours drift.
    background_index = int(np.argmin(np.linalg.norm(_PALETTE - np.median(border, axis=0), axis=1)))
    band = max(1, round(BORDER_BAND * min(height, width)))
    inner = np.zeros((height, width), dtype=bool)
    inner[band:-band, band:-band] = True
    to_palette = np.linalg.norm(pixels[:, :, None, :] - _PALETTE, axis=3)  # (H, W, colours)
    like_background = inner & (np.argmin(to_palette, axis=2) == background_index)
    background_rgb = np.median(pixels[like_background] if like_background.any() else border, axis=0)
    to_background = np.linalg.norm(pixels - background_rgb, axis=2)
    # Objects keep MARGIN from the border: ink in the outermost band is a decoder's edge, not a picture's.
    ink = inner & (to_background > MIN_CONTRAST)

    to_palette[:, :, background_index] = np.inf
    nearest = np.argmin(to_palette, axis=2)
    to_nearest = np.take_along_axis(to_palette, nearest[:, :, None], axis=2)[:, :, 0]
    # How far the nearest colour lies from the background as drawn.
    spread = np.linalg.norm(_PALETTE - background_rgb, axis=1)[nearest]
    solid = ink & (to_nearest < SOLID_SHARE * spread)
    labels = np.where(solid, nearest, -1)

    objects: list[SeenObject] = []
    claimed = np.zeros((height, width), dtype=bool)
    for core in _components(labels):
        if len(core) < MIN_OBJECT_AREA * height * width:
            break
        y, x = core[0]
        if claimed[y, x]:
            continue  # a second solid core of an object already read
        colour_index = int(labels[y, x])
        nearer = np.linalg.norm(pixels - _PALETTE[colour_index], axis=2) < to_background
        grown = next(region for region in _components(np.where(nearer, 0, -1)) if (y, x) in region)
        region = np.zeros((height, width), dtype=bool)
        region[tuple(np.array(grown).T)] = True
        claimed |= region
        objects.append(_read_object(region, _PALETTE_NAMES[colour_index], len(grown)))

    ink_count = int(ink.sum())
    near_objects = _dilate(claimed, EDGE_PIXELS)
    solidity = float((ink & near_objects).sum() / ink_count) if ink_count else 1.0
    drift = float(np.linalg.norm(background_rgb - _PALETTE[background_index]))
    return Reading(_PALETTE_NAMES[background_index], tuple(objects), solidity, drift)


def score(reading: Reading, caption: scenes.Caption) -> dict[str, float]:
    """Per-image scores of a reading against a caption: stated attributes, ``count``, ``commitment``, ``overall``."""
    scores: dict[str, float] = {}
    for name in caption.stated:
        wanted = getattr(caption, name)
        if name == "background":
            scores[name] = float(reading.background == wanted)
        else:
            matches = [getattr(item, name) == wanted for item in reading.objects]
            scores[name] = float(np.mean(matches)) if matches else 0.0
    scores["count"] = float(len(reading.objects) == caption.count)
    scores["commitment"] = float(scores["count"] and reading.solidity >= SOLID_MIN
                                 and reading.background_drift < BACKGROUND_TOLERANCE)
    stated = [scores[name] for name in caption.stated]
    scores["overall"] = 0.5 * scores["commitment"] + 0.5 * float(np.mean(stated)) if stated else scores["commitment"]
    return scores


def judge(image: Image.Image, caption: str) -> dict[str, float]:
    """Score ``image`` against ``caption`` (see the module docstring). ValueError for text outside the grammar."""
    return score(read(image), scenes.parse(caption))


SUMMARY_KEYS = ("overall", "commitment", "count", *scenes.OPEN_ATTRIBUTES)


def judge_all(pairs: Iterable[tuple[Image.Image, str]]) -> dict[str, float]:
    """Mean scores over (image, caption) pairs: ``overall``, ``commitment``, ``count``, each attribute over the
    captions that state it (absent where none does), and the count of pairs ``n``."""
    return summarize([judge(image, text) for image, text in pairs])


def summarize(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """``judge_all``'s summary of per-pair ``judge`` results."""
    if not results:
        raise ValueError("judge_all needs at least one (image, caption) pair")
    summary: dict[str, float] = {}
    for name in SUMMARY_KEYS:
        values = [result[name] for result in results if name in result]
        if values:
            summary[name] = float(np.mean(values))
    return {**summary, "n": len(results)}


def _histogram(caption: scenes.Caption, name: str, objects: Sequence[Any], background: str) -> dict[str, float]:
    """The share of each value of attribute ``name`` in one picture: over its objects (the largest ``count``,
    missing ones as ``MISSING``), or its background."""
    if name == "background":
        return {background: 1.0}
    values = [getattr(item, name) for item in objects][: caption.count]
    values += [MISSING] * (caption.count - len(values))
    return {value: share / caption.count for value, share in Counter(values).items()}


def _add_pairs(joint: dict[tuple[str, str], float], histograms: Sequence[dict[str, float]], weight: float) -> None:
    """Add the joint histogram of every pair of distinct pictures (both orders), each pair weighing ``weight``."""
    for first, second in combinations(histograms, 2):
        for a, p in first.items():
            for b, q in second.items():
                joint[(a, b)] += weight * p * q / 2
                joint[(b, a)] += weight * p * q / 2


@lru_cache(maxsize=4096)
def _reference(text: str) -> dict[str, dict[tuple[str, str], float]]:
    """What the data draws for one caption: per open attribute, the joint histogram of two independent
    pictures' values, summing to 1."""
    caption = scenes.parse(text)
    drawn = [scenes.draw_scene(caption, scenes.caption_rng(text, draw), allow_held_out=True)
             for draw in range(REFERENCE_DRAWS)]
    pairs = REFERENCE_DRAWS * (REFERENCE_DRAWS - 1) / 2
    reference: dict[str, dict[tuple[str, str], float]] = {}
    for name in caption.open:
        joint: dict[tuple[str, str], float] = defaultdict(float)
        _add_pairs(joint, [_histogram(caption, name, scene.objects, scene.background) for scene in drawn], 1 / pairs)
        reference[name] = joint
    return reference


def coverage_of(readings: Iterable[tuple[Reading, str]]) -> dict[str, float]:
    """How the pictures of each caption vary across seeds, against how the data varies.

    For each attribute a caption leaves open, every pair of pictures of that caption gives a joint histogram
    of their values; pooled over captions it is compared with the data's (pairs of independent draws, same
    weights) by total-variation distance. The pairs, not each picture alone, are what make a sampler that
    repeats one picture per caption lose as well as one that draws none. ``value`` = 1 - the mean distance
    over attributes; ``tv_<attribute>`` each distance; ``n`` pictures, ``pairs`` the pairs compared.
    """
    by_caption: dict[str, list[Reading]] = defaultdict(list)
    for reading, text in readings:
        by_caption[" ".join(text.lower().split())].append(reading)
    observed: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    expected: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    pairs = 0
    for text, group in by_caption.items():
        caption = scenes.parse(text)
        count = len(group) * (len(group) - 1) // 2
        if not count or not caption.open:
            continue
        pairs += count
        for name, joint in _reference(text).items():
            _add_pairs(observed[name], [_histogram(caption, name, reading.objects, reading.background)
                                        for reading in group], 1.0)
            for key, weight in joint.items():
                expected[name][key] += weight * count
    if not pairs:
        raise ValueError("coverage needs at least two pictures of a caption that leaves something open "
                         "(several seeds per prompt, e.g. --num_images 4)")
    distances: dict[str, float] = {}
    for name in scenes.OPEN_ATTRIBUTES:
        if name not in observed:
            continue
        seen_total, drawn_total = sum(observed[name].values()), sum(expected[name].values())
        keys = set(observed[name]) | set(expected[name])
        distances[name] = 0.5 * sum(abs(observed[name].get(key, 0.0) / seen_total
                                        - expected[name].get(key, 0.0) / drawn_total) for key in keys)
    value = 1.0 - float(np.mean(list(distances.values())))
    return {"value": value, **{f"tv_{name}": distance for name, distance in distances.items()},
            "n": sum(len(group) for group in by_caption.values()), "pairs": pairs}


def coverage(pairs: Iterable[tuple[Image.Image, str]]) -> dict[str, float]:
    """``coverage_of`` the readings of (image, caption) pairs."""
    return coverage_of((read(image), text) for image, text in pairs)
