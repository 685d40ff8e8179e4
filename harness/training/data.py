"""Training images and captions, from a Hugging Face dataset or a local folder, and the order they are read in.

Local folders come in three layouts (the seed's two, plus the ``imagefolder`` one):

- ``images/NAME.png`` with ``captions/NAME.txt``;
- ``NAME.png`` beside ``NAME.txt``;
- images with a ``metadata.jsonl`` whose lines hold ``file_name`` and a caption field.

Every image is converted to RGB, resized so that its shorter side is the training resolution, and
centre-cropped to a square.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Tried in this order when --image_column / --caption_column are not given.
IMAGE_COLUMNS = ("image", "img", "images", "picture", "file_name")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence", "description", "title")
METADATA_FILE = "metadata.jsonl"
# Datasets the seed names that have left the hub, and what to use instead.
REPLACED_DATASETS = {"lambdalabs/pokemon-blip-captions": "lambdalabs/naruto-blip-captions"}


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
        raise HarnessError(f"--data_dir '{folder}' is not a folder; pass the folder that holds your images and captions.")
    skipped: list[str] = []
    if (folder / METADATA_FILE).is_file():
        pairs = _metadata_pairs(folder, caption_column)
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
    return Examples(f"folder '{folder}'", [caption for _, caption in pairs], lambda index: Image.open(paths[index]),
                    skipped)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _caption_file_pairs(images: list[Path], caption_folder: Path, skipped: list[str]) -> list[tuple[Path, str]]:
    """Images with their ``NAME.txt`` captions; images without one and captions without an image are counted."""
    pairs, uncaptioned = [], []
    for image in images:
        caption_file = caption_folder / f"{image.stem}.txt"
        if caption_file.is_file():
            pairs.append((image, caption_file.read_text(encoding="utf-8", errors="replace").strip()))
        else:
            uncaptioned.append(image)
    image_stems = {image.stem for image in images}
    orphans = [c for c in sorted(caption_folder.glob("*.txt")) if c.stem not in image_stems]
    if uncaptioned:
        skipped.append(f"{len(uncaptioned)} image(s) without a caption file, e.g. '{uncaptioned[0]}'")
    if orphans:
        skipped.append(f"{len(orphans)} caption(s) without an image, e.g. '{orphans[0]}'")
    return pairs


def _readable(pairs: list[tuple[Path, str]], skipped: list[str]) -> list[tuple[Path, str]]:
    """The pairs whose image file opens as an image; the others are counted in ``skipped``."""
    readable, broken = [], []
    for path, caption in pairs:
        try:
            with Image.open(path) as image:
                image.verify()
            readable.append((path, caption))
        except (OSError, SyntaxError, ValueError):  # PIL reports damaged files with any of these
            broken.append(path)
    if broken:
        skipped.append(f"{len(broken)} unreadable image(s), e.g. '{broken[0]}'")
    return readable


def _metadata_pairs(folder: Path, caption_column: str | None) -> list[tuple[Path, str]]:
    metadata = folder / METADATA_FILE
    pairs = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            column = caption_column or next(c for c in CAPTION_COLUMNS if c in row)
            pairs.append((folder / row["file_name"], _caption_text(row[column])))
        except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
            raise HarnessError(
                f"{metadata} line {number} is not a JSON object with 'file_name' and a caption field "
                f"({caption_column or ', '.join(CAPTION_COLUMNS)}); fix the line or pass --caption_column."
            ) from None
    missing = [path for path, _ in pairs if not path.is_file()]
    if missing:
        raise HarnessError(f"{METADATA_FILE} names {len(missing)} missing image(s), e.g. '{missing[0]}'.")
    return pairs


def centre_crop(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, the shorter side resized to ``resolution``, then the centre square."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """A (3, H, W) float tensor in [-1, 1], the range SD's VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items ``{"pixel_values": (3, R, R) in [-1, 1], "caption": str}``, decoded on access."""

    def __init__(self, examples: Examples, resolution: int):
        self.examples = examples
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        try:
            image = self.examples.read_image(index)
        except OSError as error:
            raise HarnessError(f"cannot read image {index} of {self.examples.source}: {error}; "
                               "remove or replace the file.") from None
        return {"pixel_values": to_pixels(centre_crop(image, self.resolution)),
                "caption": self.examples.captions[index]}


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
        self._epoch, self._epoch_order = -1, []

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
