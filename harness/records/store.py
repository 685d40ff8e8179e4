"""Benchmark records (``records.jsonl``) and crash-safe file writing.

Each line of ``records.jsonl`` is one JSON object for one (sampler, steps) measurement; its fields are
documented in README.md ("Records"). Lines are appended, flushed and fsynced one at a time, so a run
killed at any moment leaves only whole records; every other file is written to a temporary name and
renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy
import torch
from PIL import Image

import harness
from harness.errors import HarnessError, RecordError, one_line
from harness.records.schema import SCHEMA, Record  # noqa: F401 - SCHEMA is part of this module's interface

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.md"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: torch.device, dtype: torch.dtype, plugin_manager: pluggy.PluginManager) -> dict[str, Any]:
    """What the numbers were measured on; plugins add fields through ``harness_machine_info``."""
    info: dict[str, Any] = {
        "harness": harness.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
    }
    for package in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    # One implementation at a time, in pluggy's call order, so a failing one is named.
    for implementation in reversed(plugin_manager.hook.harness_machine_info.get_hookimpls()):
        try:
            implementation.function(info=info)
        except Exception as error:  # noqa: BLE001
            raise HarnessError(f"the plugin '{implementation.plugin_name}' failed in harness_machine_info: "
                               f"{one_line(error)}; fix or uninstall that plugin.") from None
    return info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the harness source tree, when it runs from a git checkout."""
    source = Path(harness.__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def append_record(path: Path, record: Record) -> None:
    """Append one record as one line, flushed and fsynced: a crash leaves only whole lines before it.

    A symlink in the record file's place is refused rather than followed, so records never land outside
    the run folder.
    """
    line = json.dumps(record.to_json(), default=str) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        if Path(path).is_symlink():
            raise HarnessError(f"'{path}' is a symbolic link; harness writes records only into a plain file inside "
                               "the run folder: remove the link or pass another --outdir.") from None
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path, on_skip: Callable[[str], None] | None = None) -> list[Record]:
    """The records of a run folder or a records file, each checked against the schema.

    A line that is not a record (a torn last line from a crash, bytes that are not UTF-8, JSON of another
    kind or schema, a field of the wrong type) is named as ``line N of FILE: what is wrong``: passed to
    ``on_skip`` and left out, or, without ``on_skip``, raised as a :class:`RecordError`.
    """
    path = Path(path)
    if path.is_dir() and path.name != RECORDS_FILE:
        path = path / RECORDS_FILE
    if not path.is_file():
        what = "is a folder, not a file" if path.exists() else "does not exist"
        raise HarnessError(f"'{path}' {what}; pass a run folder written by `harness bench` (it holds {RECORDS_FILE}).")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise HarnessError(f"cannot read '{path}': {error.strerror or error}; check its permissions.") from None
    found = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            found.append(_parse_line(raw))
        except RecordError as error:
            problem = f"line {number} of {path}: {error.message}"
            if on_skip is None:
                raise RecordError(problem) from None
            on_skip(problem + "; skipped")
    return found


def _parse_line(raw: bytes) -> Record:
    return Record.from_json(json_line(raw, "not JSON (a line cut short by a crash, or not written by harness)"))


def json_line(raw: bytes, not_json: str = "not JSON") -> Any:
    """One line of a JSON-lines file, parsed; a RecordError says what it is instead (``not_json`` for bad JSON)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordError("not UTF-8 text") from None
    except (ValueError, RecursionError):  # ValueError: a JSONDecodeError, or a whole number of over 4300 digits
        raise RecordError(not_json) from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, _FILE_MODE)  # mkstemp makes 0600 files; results get what the umask gives any new file
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_folder_atomic(target: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """Fill a hidden staging folder beside ``target`` with ``write``, then rename it to ``target``.

    A process killed while writing leaves only the hidden folder, which no reader picks up. An existing
    ``target`` is replaced, unless ``keep_existing``: then the folder already there wins (a cache another
    process filled first) and the staged copy is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.parent / f".{target.name}.tmp-{tag}"
    staging.mkdir()
    try:
        write(staging)
        if not target.exists():
            try:
                staging.rename(target)
            except OSError:
                if not (keep_existing and target.is_dir()):  # lost a race to another writer
                    raise
        elif not keep_existing:
            retired = target.parent / f".{target.name}.old-{tag}"
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        # A folder name that is not UTF-8 reaches the text as lone surrogates ('\udcff'): they are written escaped,
        # as the text \udcff, rather than failing the whole file.
        temp.write_text(text, encoding="utf-8", errors="backslashreplace")


def save_image_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


def dump(records: Sequence[Record]) -> str:
    return json.dumps([record.to_json() for record in records], indent=2, default=str)

