"""Training images and captions, from a Hugging Face dataset or a local folder, and the order they are read in.

Local folders come in three layouts (the seed's two, plus the ``imagefolder`` one):

- ``images/NAME.png`` with ``captions/NAME.txt``;
- ``NAME.png`` beside ``NAME.txt``;
- images with a ``metadata.jsonl`` whose lines hold ``file_name`` and a caption field.

Every image is converted to RGB, resized so that its shorter side is the training resolution, and
centre-cropped to a square. What cannot be used - a metadata line that is not valid, a caption file that is not
UTF-8, an image that does not open, is larger than Pillow's decompression-bomb limit or is a thin strip (more than
``MAX_ASPECT_RATIO`` times longer on one side than the other) - is left out and counted in ``Examples.skipped``,
one line per kind.
"""

from __future__ import annotations

import stat
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError, RecordError, one_line
from harness.records.store import json_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Tried in this order when --image_column / --caption_column are not given.
IMAGE_COLUMNS = ("image", "img", "images", "picture", "file_name")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence", "description", "title")
METADATA_FILE = "metadata.jsonl"
# Datasets the seed names that have left the hub, and what to use instead.
REPLACED_DATASETS = {"lambdalabs/pokemon-blip-captions": "lambdalabs/naruto-blip-captions"}
# What Pillow raises for a damaged or hostile image file, besides the decompression-bomb guard.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
# A thinner image keeps under 1/64 of itself in the centre crop, and resizing its short side to the resolution
# first makes it huge: a 1.6 KB PNG of 1x400000 pixels becomes 64x25,600,000 (7 GB), under the bomb guard's limit.
MAX_ASPECT_RATIO = 64


@dataclass
class Examples:
    """A data source: every caption, and how to read image ``i``."""

    source: str
    captions: list[str]
    read_image: Callable[[int], Image.Image]
    skipped: list[str] = field(default_factory=list)  # one line per kind of example left out, with its count

    def __len__(self) -> int:
        return len(self.captions)

    def first(self, count: int | None) -> Examples:
        if count is None or count >= len(self):
            return self
        return Examples(f"{self.source} (first {count})", self.captions[:count], self.read_image, self.skipped)


def find_examples(dataset_name: str | None, data_dir: str | None, image_column: str | None = None,
                  caption_column: str | None = None, max_train_samples: int | None = None) -> Examples:
    """The training examples; a missing, empty or unreadable source ends in one HarnessError line."""
    if dataset_name is not None:
        examples = _hub_examples(dataset_name, image_column, caption_column)
    else:
        assert data_dir is not None, "pass dataset_name or data_dir"  # TrainConfig.check() asks for one
        examples = _local_examples(Path(data_dir).expanduser(), caption_column)
    if not len(examples):
        raise HarnessError(f"{examples.source} holds no examples; check the dataset or folder.")
    return examples.first(max_train_samples)


def _hub_examples(name: str, image_column: str | None, caption_column: str | None) -> Examples:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as error:  # noqa: BLE001 - offline, missing, gated and malformed datasets all end here
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        if name in REPLACED_DATASETS:
            raise HarnessError(
                f"cannot load dataset '{name}' ({reason}); it was taken down from the hub in 2024: use "
                f"--dataset_name {REPLACED_DATASETS[name]} (same image/text columns) or --data_dir."
            ) from None
        raise HarnessError(
            f"cannot load dataset '{name}' ({reason}); check the name and the network (HF_HUB_OFFLINE must be "
            "unset to download), or pass --data_dir with local images and captions."
        ) from None
    features = dataset.features
    image_column = _pick_column(name, "image", features, image_column,
                                [c for c, f in features.items() if isinstance(f, datasets.Image)] + list(IMAGE_COLUMNS))
    caption_column = _pick_column(name, "caption", features, caption_column, list(CAPTION_COLUMNS))
    captions = [_caption_text(value) for value in dataset[caption_column]]

    def read_image(index: int) -> Image.Image:
        value = dataset[index][image_column]
        return value if isinstance(value, Image.Image) else Image.open(value)

    return Examples(f"dataset '{name}'", captions, read_image)


def _pick_column(dataset: str, what: str, features, requested: str | None, candidates: Sequence[str]) -> str:
    if requested is not None:
        if requested not in features:
            raise HarnessError(f"dataset '{dataset}' has no column '{requested}'; its columns: {', '.join(features)}.")
        return requested
    found = next((column for column in candidates if column in features), None)
    if found is None:
        raise HarnessError(f"cannot tell which column of dataset '{dataset}' holds the {what}s "
                           f"(columns: {', '.join(features)}); pass --{what}_column.")
    return found


def _caption_text(value) -> str:
    # Some datasets hold several captions per image; the first one is used.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return str(value or "").strip()


def _local_examples(folder: Path, caption_column: str | None) -> Examples:
    if not folder.is_dir():
        raise HarnessError(
            f"--data_dir '{folder}' is not a folder; pass the folder that holds your images and captions."
        )
    skipped: list[str] = []
    if (folder / METADATA_FILE).is_file():
        pairs = _metadata_pairs(folder, caption_column, skipped)
    elif (folder / "images").is_dir() and (folder / "captions").is_dir():
        pairs = _caption_file_pairs(_images_in(folder / "images"), folder / "captions", skipped)
    else:
        pairs = _caption_file_pairs(_images_in(folder), folder, skipped)
    pairs = _readable(pairs, skipped)
    if not pairs:
        reasons = f" ({'; '.join(skipped)})" if skipped else ""
        raise HarnessError(
            f"--data_dir '{folder}' holds no usable image with a caption{reasons}; expected images/*.png + "
            f"captions/*.txt, *.png beside *.txt, or images with a {METADATA_FILE}."
        )
    paths = [path for path, _ in pairs]
    return Examples(
        f"folder '{folder}'", [caption for _, caption in pairs], lambda index: Image.open(paths[index]), skipped
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caption_file_pairs(images: list[Path], caption_folder: Path, skipped: list[str]) -> list[tuple[Path, str]]:
    """Images with their ``NAME.txt`` captions; images without one and captions without an image are counted."""
    pairs, uncaptioned, unreadable = [], [], []
    for image in images:
        caption_file = caption_folder / f"{image.stem}.txt"
        if not caption_file.is_file():
            uncaptioned.append(image)
            continue
        try:
            pairs.append((image, caption_file.read_text(encoding="utf-8").strip()))
        except (OSError, UnicodeDecodeError):  # a caption read with replacement characters would train on noise
            unreadable.append(caption_file)
    image_stems = {image.stem for image in images}
    orphans = [c for c in sorted(caption_folder.glob("*.txt")) if c.stem not in image_stems]
    if uncaptioned:
        skipped.append(f"{len(uncaptioned)} image(s) without a caption file, e.g. '{uncaptioned[0]}'")
    if orphans:
        skipped.append(f"{len(orphans)} caption(s) without an image, e.g. '{orphans[0]}'")
    if unreadable:
        skipped.append(f"{len(unreadable)} caption file(s) that are not UTF-8 text, e.g. '{unreadable[0]}'")
    return pairs


def _readable(pairs: list[tuple[Path, str]], skipped: list[str]) -> list[tuple[Path, str]]:
    """The pairs whose image file opens as an image of a size Pillow decodes; the others are counted in ``skipped``.

    Checked here, not when a batch needs the image, so a bad file is left out and counted instead of stopping
    the run. ``Image.open`` reads the header only: a decompression bomb is caught before its pixels are decoded.
    """
    readable, broken, huge, thin = [], [], [], []
    for path, caption in pairs:
        try:
            with _bomb_guard(), Image.open(path) as image:
                image.verify()
                if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
                    thin.append((path, image.size))
                    continue
            readable.append((path, caption))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            huge.append(path)
        except IMAGE_ERRORS:
            broken.append(path)
    if broken:
        skipped.append(f"{len(broken)} unreadable image(s), e.g. '{broken[0]}'")
    if huge:
        skipped.append(f"{len(huge)} unreadable image(s) larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} "
                       f"pixels (a guard against decompression bombs), e.g. '{huge[0]}'")
    if thin:
        path, (width, height) = thin[0]
        skipped.append(f"{len(thin)} image(s) more than {MAX_ASPECT_RATIO} times longer on one side than the other, "
                       f"which the centre crop would reduce to a sliver, e.g. '{path}' ({width}x{height} pixels)")
    return readable


@contextmanager
def _bomb_guard() -> Iterator[None]:
    """Pillow only warns between 1x and 2x its pixel limit; inside this block that warning is raised, so such an
    image is refused like one above 2x, without changing Pillow's global limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _metadata_pairs(folder: Path, caption_column: str | None, skipped: list[str]) -> list[tuple[Path, str]]:
    """The image and caption of every usable line of ``metadata.jsonl``.

    A line that is not usable (not UTF-8, not a JSON object, no file name or caption string, a file outside the
    data folder or missing) is named as ``line N of FILE: what is wrong`` and counted in ``skipped``: one bad line
    of a large data set should not stop a run, and the notice says where to look.
    """
    metadata = folder / METADATA_FILE
    try:
        data = metadata.read_bytes()
    except OSError as error:
        raise HarnessError(f"cannot read '{metadata}': {error.strerror or error}; check its permissions.") from None
    pairs, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            pairs.append(_metadata_line(folder, raw, caption_column))
        except RecordError as error:
            problems.append(f"line {number} of {metadata}: {error.message}")
    if problems:
        skipped.append(f"{len(problems)} unusable line(s) of {METADATA_FILE}, e.g. {problems[0]}")
    return pairs


def _metadata_line(folder: Path, raw: bytes, caption_column: str | None) -> tuple[Path, str]:
    """One line of ``metadata.jsonl`` as (image, caption); RecordError says what is wrong with it."""
    row = json_line(raw)
    if not isinstance(row, dict):
        raise RecordError("not a JSON object")
    return _metadata_image(folder, row.get("file_name")), _metadata_caption(row, caption_column)


def _metadata_image(folder: Path, name: object) -> Path:
    if name is None:
        raise RecordError("no 'file_name' field")
    if not isinstance(name, str):
        raise RecordError("'file_name' is not a string")
    relative = Path(name)
    if not name.strip() or "\0" in name:
        raise RecordError(f"'file_name' {_shown(name)} is not a file name")
    # Only files inside the data folder: a shared metadata file must not make training read elsewhere.
    if relative.is_absolute() or relative.anchor or ".." in relative.parts:
        raise RecordError(f"'file_name' {_shown(name)} lies outside the data folder (an absolute path or '..')")
    path = folder / relative
    try:
        is_file = stat.S_ISREG(path.stat().st_mode)
    except OSError:  # missing, or a name the file system refuses (too long, ...)
        is_file = False
    if not is_file:
        raise RecordError(f"'file_name' {_shown(name)} is not a file in the data folder")
    return path


def _shown(name: str) -> str:
    """A file name as a notice quotes it: escaped to one line, and cut short, as a hostile one may be huge."""
    text = repr(name)
    return text if len(text) <= 100 else text[:96] + "...'"


def _metadata_caption(row: dict[str, Any], caption_column: str | None) -> str:
    column = caption_column or next((c for c in CAPTION_COLUMNS if c in row), None)
    if column is None or column not in row:
        wanted = f"'{caption_column}'" if caption_column else ", ".join(CAPTION_COLUMNS)
        raise RecordError(f"no caption field ({wanted})")
    caption = row[column]
    # Several captions per image are allowed, as in Hugging Face datasets; the first one is used.
    if isinstance(caption, list) and all(isinstance(item, str) for item in caption):
        caption = caption[0] if caption else ""
    if not isinstance(caption, str):
        raise RecordError(f"'{column}' is not a string")
    return caption.strip()


def centre_crop(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, the shorter side resized to ``resolution``, then the centre square."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    # A hub dataset's image is not checked beforehand like a folder's; a thin one must not be resized into GBs.
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise Image.DecompressionBombError(f"a {image.width}x{image.height} image resized to {width}x{height} pixels "
                                           f"exceeds Pillow's limit of {Image.MAX_IMAGE_PIXELS}")
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A (3, H, W) float tensor in [-1, 1], the range SD's VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Items ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str}``, decoded on access."""

    def __init__(self, examples: Examples, resolution: int):
        self.examples = examples
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # Decoding happens here, so damage the header check could not see (a truncated JPEG, a hub dataset's
        # image) ends in one line rather than a traceback from inside the data loader.
        try:
            with _bomb_guard():
                pixels = to_pixels(centre_crop(self.examples.read_image(index), self.resolution))
        except (*IMAGE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise HarnessError(
                f"cannot read image {index} of {self.examples.source}: {one_line(error).rstrip('.')}; remove or "
                "replace the file."
            ) from None
        return {"pixel_values": pixels, "caption": self.examples.captions[index]}


class StreamBatchSampler:
    """One process's batches from an endless stream of shuffled epochs, starting anywhere in it.

    Epoch ``e`` visits every example once, in an order drawn from ``seed`` and ``e`` alone. The global
    batch at stream position ``p`` is ``stream[p : p + batch_size * world_size]``; process ``rank`` takes its
    own slice of it. Where a run stands is one number (samples seen), so a resumed run reads exactly the
    batches the uninterrupted run would have read.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self._epoch = -1
        self._epoch_order: list[int] = []

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start + self.rank * self.batch_size
        while True:
            yield [self._index(position + offset) for offset in range(self.batch_size)]
            position += self.global_batch

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        # Positions only grow, so the current epoch's order is the only one worth keeping.
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._epoch_order = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._epoch_order[offset]
