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
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import harness

SCHEMA = "harness.record/1"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.md"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: torch.device, dtype: torch.dtype, plugin_manager) -> dict[str, Any]:
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
    plugin_manager.hook.harness_machine_info(info=info)
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


def append_record(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a run folder or a records file; a torn last line (from a crash) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.is_file():
        from harness.errors import HarnessError

        raise HarnessError(f"no {RECORDS_FILE} at '{path}'; pass a run folder written by `harness bench`.")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
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
        temp.write_text(text, encoding="utf-8")


def save_image_atomic(image, path: Path) -> None:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


def dump(records: list[dict[str, Any]]) -> str:
    return json.dumps(records, indent=2, default=str)

