"""The prompt-fidelity judge: does a picture show what its shapes caption (``harness.shapes``) says?

It reads the five attributes back from pixels, with no model, the same way every time:

1. background: the per-channel median of the outermost ring of pixels (shapes keep a margin, so the
   border is background);
2. the shape: the pixels nearer to the shape's colour (the median of the pixels far from the background)
   than to the background - a threshold halfway between the two, so blur moves no edge - of which only
   the largest 4-connected region counts;
3. position: the anchor of ``ANCHORS`` nearest to the centre of the region's bounding box;
4. size: large when the box's longer side exceeds ``LARGE_ABOVE`` of the image side;
5. shape: a triangle (apex up) when less than ``TRIANGLE_BELOW`` of the region lies in the upper half of
   its box; otherwise a square when it is more than ``SQUARE_ABOVE`` times as wide along the diagonals as
   along the axes (a square is sqrt(2) times, a circle once), else a circle;
6. colours: the nearest of ``COLOURS`` to the background's median and to the median of the region's
   interior (its pixels farther from the background than its median pixel, which blur leaves alone).

Its thresholds are fixed by ``tests/test_shapes.py`` (clean, blurred and noisy renders, shuffled
captions), never by how well some model scores. ``overall`` is the fraction of the five attributes that
are right.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from harness.shapes import ANCHORS, ATTRIBUTE_NAMES, COLOURS, SIZES, parse_caption

_PALETTE = np.array(list(COLOURS.values()), dtype=float)
_PALETTE_NAMES = list(COLOURS)
# Halfway between the small and the large box side.
LARGE_ABOVE = (SIZES["small"] + SIZES["large"]) / 2
# An apex-up triangle has a quarter of its area in the upper half of its box, a circle or square half.
TRIANGLE_BELOW = (0.25 + 0.5) / 2
# A circle is as wide along its diagonals as along its axes, a square sqrt(2) times as wide.
SQUARE_ABOVE = (1.0 + np.sqrt(2)) / 2
# Below this RGB distance from the background nothing counts as a shape: a flat picture shows none. The
# closest two named colours are 94 apart; the 99th percentile of noise with sigma 8 per channel is 27.
MIN_CONTRAST = 40.0


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (a boolean array), as a mask of the same shape."""
    height, width = mask.shape
    inside = mask.tolist()  # Python lists index far faster than numpy arrays one pixel at a time
    seen = [[False] * width for _ in range(height)]
    best: list[tuple[int, int]] = []
    for start_y, start_x in zip(*np.nonzero(mask)):
        if seen[start_y][start_x]:
            continue
        seen[start_y][start_x] = True
        region, stack = [], [(int(start_y), int(start_x))]
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and inside[ny][nx] and not seen[ny][nx]:
                    seen[ny][nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    ys, xs = zip(*best)
    out[list(ys), list(xs)] = True
    return out


def describe(image: Image.Image) -> dict[str, str | None]:
    """What the judge sees: a value for each attribute of ``ShapeAttributes``; None where no shape shows."""
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    seen: dict[str, str | None] = dict.fromkeys(ATTRIBUTE_NAMES)
    seen["background"] = _nearest_colour(background)

    distance = np.linalg.norm(pixels - background, axis=2)
    # A high percentile rather than the maximum, so that noise alone never makes a shape; the smallest
    # shape covers about 2% of the image.
    contrast = np.percentile(distance, 99)
    if contrast < MIN_CONTRAST:
        return seen
    foreground = np.median(pixels[distance > contrast / 2], axis=0)
    nearer_foreground = np.linalg.norm(pixels - foreground, axis=2) < distance
    if not nearer_foreground.any():
        return seen
    region = _largest_region(nearer_foreground)

    ys, xs = np.nonzero(region)
    box_width, box_height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    centre_x, centre_y = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    centre = np.array([centre_x / width, centre_y / height])
    seen["position"] = min(ANCHORS, key=lambda name: float(np.linalg.norm(centre - ANCHORS[name])))
    seen["size"] = "large" if max(box_width / width, box_height / height) > LARGE_ABOVE else "small"
    upper_share = float(np.mean(ys + 0.5 < centre_y))
    # Along the diagonals a pixel spans sqrt(2), so a box of whole pixels measures sqrt(2) times its side.
    diagonal = np.mean([np.ptp(xs + ys), np.ptp(xs - ys)]) / np.sqrt(2) + np.sqrt(2)
    corners = diagonal / np.mean([box_width, box_height])
    seen["shape"] = "triangle" if upper_share < TRIANGLE_BELOW else "square" if corners > SQUARE_ABOVE else "circle"
    interior = region & (distance >= np.median(distance[region]))
    seen["colour"] = _nearest_colour(np.median(pixels[interior], axis=0))
    return seen


def judge(image: Image.Image, caption: str) -> dict[str, float | bool]:
    """Score ``image`` against ``caption``: one boolean per attribute, and ``overall`` (the fraction right).

    ValueError if the caption is not of the shapes grammar.
    """
    wanted = parse_caption(caption)
    seen = describe(image)
    scores: dict[str, float | bool] = {name: seen[name] == getattr(wanted, name) for name in ATTRIBUTE_NAMES}
    scores["overall"] = sum(scores.values()) / len(ATTRIBUTE_NAMES)
    return scores


def judge_all(pairs: Iterable[tuple[Image.Image, str]]) -> dict[str, float]:
    """Accuracy per attribute and ``overall`` (their mean) over (image, caption) pairs, with their count ``n``."""
    results = [judge(image, text) for image, text in pairs]
    if not results:
        raise ValueError("judge_all needs at least one (image, caption) pair")
    summary = {name: float(np.mean([result[name] for result in results])) for name in (*ATTRIBUTE_NAMES, "overall")}
    return {**summary, "n": len(results)}
