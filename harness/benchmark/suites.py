"""Prompt suites for ``--prompts``: the caption sets the field's papers report FID and CLIP score on, drawn the
way they draw them, and local files of captions (JSONL, CSV or Parquet).

A suite names a Hugging Face data set, its split and its caption column (:data:`SUITES`). It is loaded with
``datasets`` (from the local cache, or the hub), or from a local copy (``--prompt_source``). The COCO suites
draw, as the papers do, N images of the val split and one of each image's captions; ``--prompt_seed`` fixes
which, and the run records it (``config.prompt_suite``), so a figure says which 5,000 captions it used.

The draw is a hash, not a random generator: image ``k`` (its ``image_id`` / ``cocoid``, else its row number)
ranks by ``sha256("{seed}:{k}")``, the N lowest are taken in that order, and its caption is number
``sha256("{seed}:{k}:caption") mod n`` of its n captions, sorted. The same seed gives the same captions with
any version of Python or numpy, from any copy of the data set in any row order, and the first 5,000 of a 30,000
draw are the 5,000 draw of the same seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.benchmark.prompts import PROMPT_SETS, _read_text, load_prompts, lone_surrogate
from harness.errors import HarnessError

DRAW = "sha256-rank/1"  # recorded: the draw's method, renamed if it ever changes
CAPTION_COLUMNS = ("caption", "captions", "prompt", "prompts", "text", "sentences")  # auto-detected, any case
KEY_COLUMNS = ("image_id", "cocoid")  # an image's identity: rows sharing one are one image's captions
CAPTION_FIELDS = ("raw", "caption", "text", "sentence")  # a caption stored as a struct (Karpathy's sentences)
TABLE_SUFFIXES = {".csv": "CSV", ".tsv": "TSV", ".parquet": "Parquet"}
LOCAL_COPY = ("a folder written by datasets' save_to_disk, or a JSONL, CSV or Parquet file with one row per image "
              "or per caption")


@dataclass(frozen=True)
class Suite:
    """A built-in suite: where its captions come from and how many images it draws."""

    dataset: str  # Hugging Face data set id
    split: str  # split expression for datasets.load_dataset ("a+b" joins splits)
    column: str  # the caption column: a text, or several captions of one image
    size: int | None  # images drawn; None: every row, in the data set's order
    about: str


# Karpathy's split of COCO 2014 cuts val2014 (40,504 images) into restval (30,504), validation and test (5,000
# each); the three together are the whole val2014 split the COCO-2014 figures draw from.
VAL2014 = "restval+validation+test"
SUITES: dict[str, Suite] = {
    "coco2014-5k": Suite("yerevann/coco-karpathy", VAL2014, "sentences", 5000,
                         "5,000 of the 40,504 COCO 2014 val images, one caption each"),
    "coco2017-5k": Suite("phiyodr/coco2017", "validation", "captions", 5000,
                         "the 5,000 COCO 2017 val images, one caption each"),
    "coco-30k": Suite("yerevann/coco-karpathy", VAL2014, "sentences", 30000,
                      "30,000 of the 40,504 COCO 2014 val images, one caption each"),
    "parti": Suite("nateraw/parti-prompts", "train", "Prompt", None, "PartiPrompts: 1,632 prompts"),
    "drawbench": Suite("sayakpaul/drawbench", "train", "Prompts", None, "DrawBench: 200 prompts"),
}


@dataclass(frozen=True)
class Images:
    """What a source holds: each image's captions (a prompt file: one prompt per row) and its key."""

    source: str  # for messages: "dataset 'x' (validation split)", "file 'p.csv'"
    column: str | None
    key_column: str | None
    captions: list[list[str]]
    keys: list[str]


@dataclass(frozen=True)
class PromptSet:
    """The prompts of ``--prompts``, and what the run records about where they came from (None: a plain file of
    prompts or a built-in set, taken whole)."""

    prompts: list[str]
    suite: dict[str, Any] | None = None


def load_prompt_set(name_or_path: str, column: str | None = None, seed: int = 0, count: int | None = None,
                    source: str | None = None) -> PromptSet:
    """The prompts of a suite, a file of captions (JSONL, CSV, Parquet, a ``save_to_disk`` folder), a prompt file
    or a built-in set; ``count`` draws that many with ``seed`` (a suite draws its own size by default)."""
    path = Path(name_or_path).expanduser()
    if not path.exists() and name_or_path in SUITES:
        return _suite(name_or_path, column, seed, count, source)
    if source is not None:
        raise HarnessError(f"--prompt_source is the local copy of a suite ({', '.join(SUITES)}); '{name_or_path}' "
                           "is not one: pass the file itself as --prompts, or name a suite.")
    if not path.exists() and name_or_path not in PROMPT_SETS:
        raise HarnessError(f"--prompts '{name_or_path}' is neither a file nor a built-in prompt set or suite; pass "
                           "a text file with one prompt per line, a JSONL, CSV or Parquet file with a caption column, "
                           f"or one of: {', '.join([*PROMPT_SETS, *SUITES])}.")
    if path.exists() and _is_table(path, column):
        images = read_images(path, column)
        return _drawn(images, None, seed, count, {"file": str(path)})
    if column is not None:
        raise HarnessError(f"--prompt_column names a column of a JSONL, CSV or Parquet file; '{name_or_path}' "
                           "holds one prompt per line: leave --prompt_column out.")
    prompts = load_prompts(name_or_path)
    if count is None:
        return PromptSet(prompts)
    name = None if path.exists() else name_or_path
    where = f"prompt file '{path}'" if path.exists() else f"prompt set '{name_or_path}'"
    images = Images(where, None, None, [[prompt] for prompt in prompts], [str(i) for i in range(len(prompts))])
    return _drawn(images, name, seed, count, {"file": str(path)} if name is None else {})


def _suite(name: str, column: str | None, seed: int, count: int | None, source: str | None) -> PromptSet:
    suite = SUITES[name]
    where = {"dataset": suite.dataset, "split": suite.split}
    if source is None:
        images = _hub_images(name, suite, column)
    else:
        local = Path(source).expanduser()
        if not local.exists():
            raise HarnessError(f"--prompt_source '{source}' does not exist; pass a local copy of {suite.dataset} "
                               f"({LOCAL_COPY}).")
        images = read_images(local, column, suite.split, suite.column)
        where["file"] = str(local)
    wanted = count if count is not None else suite.size
    if wanted is not None and wanted > len(images.captions):
        fix = (f"pass the whole {suite.split} split with --prompt_source" if source is not None
               else "check the data set")
        raise HarnessError(f"{name} draws {wanted} images, but {images.source} holds {len(images.captions)}; {fix}, "
                           f"or draw {len(images.captions)} or fewer with --prompt_count.")
    return _drawn(images, name, seed, wanted, where)


def _drawn(images: Images, name: str | None, seed: int, count: int | None, where: dict[str, str]) -> PromptSet:
    """``count`` images drawn with ``seed`` (None: all, in order), one caption of each; and the record of it."""
    total = len(images.captions)
    if count is not None and count > total:
        raise HarnessError(f"--prompt_count {count} asks for more prompts than {images.source} holds ({total}); "
                           f"ask for {total} or fewer.")
    order = range(total) if count is None else sorted(range(total), key=lambda i: _hash(seed, images.keys[i]))[:count]
    prompts = [_pick(seed, images.keys[i], images.captions[i]) for i in order]
    record = {"name": name, **where, "column": images.column, "image_key": images.key_column, "images": total,
              "count": len(prompts), "seed": seed, "draw": DRAW}
    return PromptSet(prompts, record)


def _hash(seed: int, *parts: str) -> bytes:
    return hashlib.sha256(":".join((str(seed), *parts)).encode("utf-8", "surrogatepass")).digest()


def _pick(seed: int, key: str, captions: Sequence[str]) -> str:
    if len(captions) == 1:
        return captions[0]
    ordered = sorted(captions)  # the same caption, whatever order a copy lists an image's captions in
    return ordered[int.from_bytes(_hash(seed, key, "caption")[:8], "big") % len(ordered)]


# ----- the hub -----

def _hub_images(name: str, suite: Suite, column: str | None) -> Images:
    import datasets

    what = f"the Hugging Face dataset {suite.dataset}, {suite.split} split"
    try:
        with _quiet_hub():
            dataset = datasets.load_dataset(suite.dataset, split=suite.split)
    except Exception as error:  # noqa: BLE001 - offline, missing, gated and malformed data sets all end here
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        local = f"pass --prompt_source with a local copy ({LOCAL_COPY}), or --prompts FILE.jsonl with a caption column"
        if _offline(error):
            raise HarnessError(f"cannot load {name} ({what}) offline: it is not in the local Hugging Face cache "
                               f"({reason}); download it once with network (HF_HUB_OFFLINE unset), or {local}."
                               ) from None
        raise HarnessError(f"cannot load {name} ({what}): {reason}; check the network, or {local}.") from None
    return _dataset_images(dataset, f"dataset '{suite.dataset}' ({suite.split} split)", column, suite.column)


def _offline(error: BaseException) -> bool:
    """Whether loading failed for want of the network (the hub unreachable, HF_HUB_OFFLINE set)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    markers = ("Couldn't reach", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "offline mode")
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectTimeout",
                         "ConnectError", "TimeoutError"}) or any(marker in str(error) for marker in markers)


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """No progress bars or retry notices while loading: the one line that follows says what went wrong."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("datasets", "huggingface_hub", "fsspec")]
    levels = [logger.level for logger in loggers]
    bars = datasets.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ----- local copies -----

def _is_table(path: Path, column: str | None) -> bool:
    """Whether a file is read by columns: a folder, CSV/TSV/Parquet, or JSONL that names no 'prompt' (or whose
    column is named); a JSONL file of ``{"prompt": ...}`` lines stays with the prompt file reader."""
    if path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES:
        return True
    if not path.is_file() or (path.suffix.lower() != ".jsonl" and column is None):
        return False
    first = next((line.strip() for line in _read_text(path).split("\n") if line.strip()), "")
    if not first.startswith("{"):
        return False
    if column is not None:
        return True
    try:
        row = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(row, dict) and "prompt" not in row and _find(list(row), None) is not None


def read_images(path: Path, column: str | None, split: str | None = None, preferred: str | None = None) -> Images:
    """The images (rows, or rows grouped by image id) of a local file or ``save_to_disk`` folder; without
    ``column``, the captions are looked for in ``preferred`` (a suite's own column), then in CAPTION_COLUMNS."""
    if path.is_dir():
        return _folder_images(path, column, split, preferred)
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind == "Parquet":
        return _parquet_images(path, column, preferred)
    source = f"file '{path}'"
    text = _read_text(path)
    if kind is not None:
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if kind == "TSV" else ",")
        rows = list(reader)
        names = list(reader.fieldnames or [])
        numbers = list(range(2, len(rows) + 2))  # row 1 is the header
        return _row_images(source, names, rows, _column(source, names, column, preferred), "row", numbers)
    rows, names, numbers = [], [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            raise HarnessError(f"line {number} of {path}: not a JSON object; write one object per line, e.g. "
                               '{"caption": "..."}.')
        rows.append(row)
        numbers.append(number)
        names = names or list(row)
    return _row_images(source, names, rows, _column(source, names, column, preferred), "line", numbers)


def _parquet_images(path: Path, column: str | None, preferred: str | None) -> Images:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        chosen = _column(f"file '{path}'", names, column, preferred)
        key = _find(names, KEY_COLUMNS)
        table = pq.read_table(path, columns=[chosen] + ([key] if key else []))
    except HarnessError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet vary
        raise HarnessError(f"cannot read Parquet file '{path}': {(str(error).strip().splitlines() or [''])[0]}; "
                           "check that it is a Parquet file.") from None
    values = table.column(chosen).to_pylist()
    keys = table.column(key).to_pylist() if key else None
    return _collect(f"file '{path}'", chosen, key, values, keys)


def _folder_images(path: Path, column: str | None, split: str | None, preferred: str | None) -> Images:
    import datasets

    try:
        with _quiet_hub():
            loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - not a datasets folder, or a damaged one
        raise HarnessError(f"cannot read '{path}' as a data set folder ({type(error).__name__}: "
                           f"{(str(error).strip().splitlines() or [''])[0]}); pass a folder written by datasets' "
                           "save_to_disk, or a JSONL, CSV or Parquet file.") from None
    if isinstance(loaded, datasets.DatasetDict):
        parts = split.split("+") if split else []
        if parts and all(part in loaded for part in parts):
            loaded = datasets.concatenate_datasets([loaded[part] for part in parts])
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise HarnessError(f"data set folder '{path}' holds the splits {', '.join(loaded)}, not "
                               f"{split or 'one split'}; save the split to use on its own.")
    return _dataset_images(loaded, f"data set folder '{path}'", column, preferred)


def _dataset_images(dataset: Any, source: str, column: str | None, preferred: str | None) -> Images:
    names = list(dataset.column_names)
    chosen = _column(source, names, column, preferred)
    key = _find(names, KEY_COLUMNS)
    return _collect(source, chosen, key, list(dataset[chosen]), list(dataset[key]) if key else None)


def _row_images(source: str, names: list[str], rows: list[dict[str, Any]], chosen: str, unit: str,
                numbers: list[int]) -> Images:
    key = _find(names, KEY_COLUMNS)
    for number, row in zip(numbers, rows):
        if row.get(chosen) is None:
            raise HarnessError(f"{unit} {number} of {source}: no '{chosen}' value; every {unit} needs one (a {unit} "
                               "is never skipped: the prompts after it would draw other seeds).")
    keys = [row.get(key) for row in rows] if key else None
    return _collect(source, chosen, key, [row[chosen] for row in rows], keys, unit, numbers)


def _column(source: str, names: Sequence[str], column: str | None, preferred: str | None = None) -> str:
    """The caption column: the one asked for, or the first of ``preferred`` and CAPTION_COLUMNS there (any case)."""
    if column is not None:
        if column not in names:
            raise HarnessError(f"{source} has no column '{column}'; its columns: {', '.join(names) or 'none'}. "
                               "Pass one of them as --prompt_column.")
        return column
    found = _find(names, ((preferred,) if preferred else ()) + CAPTION_COLUMNS)
    if found is None:
        raise HarnessError(f"cannot tell which column of {source} holds the captions (columns: "
                           f"{', '.join(names) or 'none'}); pass --prompt_column NAME.")
    return found


def _find(names: Sequence[str], wanted: Sequence[str] | None) -> str | None:
    """The first of ``wanted`` (default: CAPTION_COLUMNS) among ``names``, in any case."""
    lowered = {name.lower(): name for name in reversed(names)}
    return next((lowered[w.lower()] for w in (wanted or CAPTION_COLUMNS) if w.lower() in lowered), None)


def _collect(source: str, column: str, key: str | None, values: list[Any], keys: list[Any] | None, unit: str = "row",
             numbers: list[int] | None = None) -> Images:
    """Each image's captions in order of first appearance; rows sharing a key are one image's captions. Without a
    key column each row is an image, keyed by its number from 0."""
    by_key: dict[str, list[str]] = {}
    for index, value in enumerate(values):
        captions = _texts(value)
        if isinstance(captions, str):
            number = numbers[index] if numbers is not None else index + 1
            raise HarnessError(f"{unit} {number} of {source}: column '{column}' {captions}; every {unit} needs a "
                               f"caption (a {unit} is never skipped: the prompts after it would draw other seeds).")
        if keys is None:
            name = str(index)
        else:
            name = f"#{index}" if keys[index] is None else str(keys[index])
        by_key.setdefault(name, []).extend(captions)
    if not by_key:
        raise HarnessError(f"{source} holds no captions; pass a file or data set with one row per image or caption.")
    return Images(source, column, key, list(by_key.values()), list(by_key))


def _texts(value: Any) -> list[str] | str:
    """The captions of one cell (text, a list of texts, Karpathy's sentence structs), or what is wrong with it."""
    if isinstance(value, dict):
        field = next((name for name in CAPTION_FIELDS if name in value), None)
        if field is None:
            return f"holds an object without a {'/'.join(CAPTION_FIELDS)} field"
        value = value[field]
    items = value if isinstance(value, (list, tuple)) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = next((item[name] for name in CAPTION_FIELDS if name in item), None)
        if not isinstance(item, str):
            return f"holds {_kind(item)}, not text"
        surrogate = lone_surrogate(item)
        if surrogate is not None:
            return (f"holds the escape {surrogate}, half of a surrogate pair without its other half, which is no "
                    "character (write the character itself, or both halves of its pair)")
        if item.strip():
            texts.append(item.strip())
    return texts or "is empty"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
