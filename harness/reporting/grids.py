"""Image grids: a measurement's images side by side, and comparison grids (the baseline's row above, the
few-step sampler's below), with readable labels and caps on what a records file can make them read."""


from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from harness.records.files import save_image_atomic
from harness.records.schema import Measured, Record, successful

# Tiles smaller than this are scaled up (nearest neighbour) so grids of tiny images stay readable.
MIN_TILE = 128
LABEL_HEIGHT = 22
GAP = 4
# What one record can make a reader do: records are text anyone can edit, and a few kilobytes of them could name
# a hundred thousand images or one huge one. A grid shows at most MAX_GRID_IMAGES tiles (a comparison grid
# MAX_COMPARISON_COLUMNS a row) and MAX_GRID_PIXELS pixels in all; an image of more than MAX_SOURCE_PIXELS is not
# read; a record's first MAX_COMPARISONS comparison grids are made; `harness report` reads MAX_REPORT_IMAGES in all.
MAX_GRID_IMAGES = 256
MAX_COMPARISON_COLUMNS = 32
MAX_GRID_PIXELS = 50_000_000  # 150 MB as RGB
MAX_SOURCE_PIXELS = 4096 * 4096 * 2
MAX_COMPARISONS = 16
class GridLimitError(ValueError):
    """An image a record names is larger than a grid reads (``MAX_SOURCE_PIXELS``)."""


def _font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _tile_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    width, height = images[0].size
    scale = max(1, math.ceil(MIN_TILE / min(width, height)))
    return width * scale, height * scale


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """All images in a near-square grid, in order, row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile_w, tile_h = _tile_size(images)
    grid = Image.new("RGB", (columns * tile_w + (columns - 1) * GAP, rows * tile_h + (rows - 1) * GAP), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST),
                   (column * (tile_w + GAP), row * (tile_h + GAP)))
    return grid


def comparison_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]]) -> Image.Image:
    """One labelled row per (label, images): the seed's baseline-on-top, few-step-below comparison."""
    all_images = [image for _, images in rows for image in images]
    tile_w, tile_h = _tile_size(all_images)
    columns = max(len(images) for _, images in rows)
    font = _font()
    width = max(columns * tile_w + (columns - 1) * GAP, 320)
    canvas = Image.new("RGB", (width, len(rows) * (LABEL_HEIGHT + tile_h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, images in rows:
        draw.text((4, y + 3), label, fill="black", font=font)
        y += LABEL_HEIGHT
        for column, image in enumerate(images):
            tile = image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (column * (tile_w + GAP), y))
        y += tile_h + GAP
    return canvas


def row_label(record: Record, measured: Measured) -> str:
    seconds = measured.timing.seconds_per_image
    return f"{record.sampler} | {record.steps} steps | cfg {record.guidance_scale:g} | {seconds:.3f} s/image"


@dataclass
class GridsMade:
    """What :func:`write_grids` did: how many images it read, and what it left out to stay within its limits."""

    images_read: int = 0
    left_out: list[str] = field(default_factory=list)


def write_grids(run_dir: Path, record: Record, baselines: Sequence[Record]) -> GridsMade:
    """Write the record's grid and its comparison grids against each baseline record, within the limits above.

    Each image is read and scaled to its tile one at a time, so memory holds tiles, never the originals."""
    run_dir = Path(run_dir)
    measured = record.measured
    made = GridsMade()
    if measured is None or not measured.images:  # --save_images none: no picture, no grid
        return made
    names = measured.images[:MAX_GRID_IMAGES]
    tile = _tile_of(run_dir, names[0])
    names = names[:_tiles_that_fit(len(names), tile)]
    if len(names) < len(measured.images):
        made.left_out.append(f"its grid shows the first {len(names)} of the {len(measured.images)} images it names")
    save_image_atomic(image_grid([_open_tile(run_dir, name, tile) for name in names]), run_dir / measured.grid)
    made.images_read += len(names)
    if len(measured.comparisons) > MAX_COMPARISONS:
        made.left_out.append(f"only the first {MAX_COMPARISONS} of its {len(measured.comparisons)} comparison grids "
                             "are made")
    for comparison in measured.comparisons[:MAX_COMPARISONS]:
        baseline = next(
            ((b, bm) for b, bm in successful(baselines)
             if b.sampler == comparison.baseline_sampler and b.steps == comparison.baseline_steps),
            None,
        )
        if baseline is None:
            continue
        top_names = baseline[1].images
        tile = _tile_of(run_dir, top_names[0])
        columns = min(MAX_COMPARISON_COLUMNS, max(1, MAX_GRID_PIXELS // (2 * tile[0] * tile[1])))
        top = [_open_tile(run_dir, name, tile) for name in top_names[:columns]]
        bottom = [_open_tile(run_dir, name, tile) for name in measured.images[:columns]]
        made.images_read += len(top) + len(bottom)
        if columns < max(len(top_names), len(measured.images)):
            made.left_out.append(f"its comparison grid '{comparison.path}' shows the first {columns} images of each "
                                 "row")
        grid = comparison_grid([(row_label(*baseline), top), (row_label(record, measured), bottom)])
        save_image_atomic(grid, run_dir / comparison.path)
    return made


def _tiles_that_fit(count: int, tile: tuple[int, int]) -> int:
    """How many of ``count`` tiles a near-square grid (``image_grid``) holds within MAX_GRID_PIXELS (1 at least)."""
    def canvas(tiles: int) -> int:
        columns = math.ceil(math.sqrt(tiles))
        return columns * math.ceil(tiles / columns) * (tile[0] + GAP) * (tile[1] + GAP)

    while count > 1 and canvas(count) > MAX_GRID_PIXELS:
        count = min(count - 1, max(1, MAX_GRID_PIXELS // ((tile[0] + GAP) * (tile[1] + GAP))))
    return count


def _tile_of(run_dir: Path, name: str) -> tuple[int, int]:
    """The tile size of a grid whose first image is ``name``, from its header alone (no pixel decoded)."""
    with Image.open(run_dir / name) as first:
        _check_size(name, first)
        return _tile_size([first])


def _check_size(name: str, image: Image.Image) -> None:
    width, height = image.size
    if width * height > MAX_SOURCE_PIXELS:
        raise GridLimitError(f"image '{name}' is {width}x{height} pixels, more than the {MAX_SOURCE_PIXELS} a grid "
                             "reads")


def _open_tile(run_dir: Path, name: str, tile: tuple[int, int]) -> Image.Image:
    """An image of the run, fully read (so a truncated file fails here, not while pasting), scaled to ``tile`` as
    the grids draw it (nearest neighbour)."""
    with Image.open(run_dir / name) as opened:
        _check_size(name, opened)
        opened.load()
        tiled: Image.Image = opened.convert("RGB").resize(tile, Image.Resampling.NEAREST)
    return tiled


