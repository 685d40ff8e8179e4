"""Writing a captioned training set of the lab's pictures to disk, in either grammar.

``open`` draws captions and scenes from ``harness.lab.scenes`` (captions that leave attributes, count and
layout open); ``closed`` from ``harness.lab.shapes`` (every caption fixes the whole picture).
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

from PIL import Image

from harness.errors import HarnessError
from harness.lab import scenes, shapes
from harness.records.files import write_folder_atomic

GRAMMARS = ("open", "closed")


def write_dataset(out_dir: str | Path, n: int, seed: int, resolution: int = 64, grammar: str = "open",
                  notify: Callable[[str], None] | None = None) -> Path:
    """Write ``n`` examples as ``images/000000.png`` + ``captions/000000.txt`` into ``out_dir``.

    ``grammar``: "open" (``harness.lab.scenes``: captions that leave attributes, count and layout open) or
    "closed" (``harness.lab.shapes``: every caption fixes the whole picture; the data of the first embedded model).
    The same (n, seed, resolution, grammar) gives the same bytes. ``out_dir`` must not exist or be empty; the set is
    written to a hidden folder beside it and renamed, so an interrupted run leaves no half data set; the hidden
    folder a killed run left is removed by the next run into ``out_dir``, which says so through ``notify``.
    """
    out = Path(out_dir).expanduser()
    if n <= 0:
        raise HarnessError(f"--n {n}: the number of images must be at least 1.")
    shapes.check_resolution(resolution)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"--out '{out}' already exists and is not an empty folder; pass a new --out.")
    above = next(parent for parent in out.parents if parent.exists())
    if not above.is_dir():
        raise HarnessError(f"--out '{out}' lies under '{above}', which is a file, not a folder; pass an --out "
                           "outside it.")

    if grammar not in GRAMMARS:
        raise HarnessError(f"--grammar {grammar!r} is not one of {', '.join(GRAMMARS)}; pick open (the default).")
    rng = random.Random(seed)
    examples = _open_examples(rng, n) if grammar == "open" else _closed_examples(rng, n)
    width = max(6, len(str(n - 1)))
    png_cache: dict[object, bytes] = {}  # closed: 1,568 distinct pictures at most, so most are repeats

    def write(folder: Path) -> None:
        (folder / "images").mkdir()
        (folder / "captions").mkdir()
        for index, (text, picture, draw) in enumerate(examples):
            if picture not in png_cache:
                buffer = io.BytesIO()
                draw(resolution).save(buffer, format="PNG")
                png_cache[picture] = buffer.getvalue()
            name = f"{index:0{width}d}"
            (folder / "images" / f"{name}.png").write_bytes(png_cache[picture])
            (folder / "captions" / f"{name}.txt").write_text(text + "\n", encoding="utf-8")

    try:
        return write_folder_atomic(out, write, notify=notify)
    except OSError as error:
        raise HarnessError(f"cannot write the data set to '{out}': {error.strerror or error}; free some space "
                           "or pass an --out on another disk.") from None


_Example = tuple[str, object, Callable[[int], Image.Image]]  # caption, picture key, renderer by resolution


def _closed_examples(rng: random.Random, n: int) -> list[_Example]:
    examples = [shapes.sample_attributes(rng) for _ in range(n)]
    return [(shapes.caption(attrs), attrs, partial(shapes.render, attrs)) for attrs in examples]


def _open_examples(rng: random.Random, n: int) -> list[_Example]:
    examples: list[_Example] = []
    for _ in range(n):
        text = scenes.sample_caption(rng)
        scene = scenes.draw_scene(text, rng)
        examples.append((text.text(), scene, partial(scenes.render_scene, scene)))
    return examples
