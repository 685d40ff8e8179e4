"""Crash-safe file writing: every file lands whole under its name, or not at all.

Each file is written to a temporary name beside it and renamed into place; a folder is filled under a
hidden staging name and renamed. No reader ever sees half a file. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


# Errors that mean the disk cannot take more data (full, over quota, read-only, a file too large).
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
# How libraries that do not raise OSError (safetensors' Rust writer) report a full disk or quota.
_DISK_FULL_TEXTS = {errno.ENOSPC: ("No space left on device", "os error 28"),
                    errno.EDQUOT: ("Disk quota exceeded", "os error 122")}


def disk_full(error: BaseException) -> str | None:
    """The reason, when ``error`` means the disk cannot take more data (``No space left on device``), else None."""
    if isinstance(error, OSError):
        return (error.strerror or os.strerror(error.errno or 0)) if error.errno in DISK_ERRORS else None
    text = str(error)
    return next((os.strerror(code) for code, texts in _DISK_FULL_TEXTS.items() if any(t in text for t in texts)), None)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    An OSError about the temporary file (its folder is missing, the disk is full, ``path`` is a folder the rename
    cannot replace) is raised naming ``path``, the file the caller asked for, never the temporary name.
    """
    path = Path(path)
    temp: Path | None = None
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        temp = Path(temp_name)
        yield temp
        os.chmod(temp, _FILE_MODE)  # mkstemp makes 0600 files; results get what the umask gives any new file
        os.replace(temp, path)
    except OSError as error:
        if error.filename is None or Path(error.filename).name.startswith(f".{path.stem}-"):
            raise type(error)(error.errno, error.strerror or str(error), str(path)) from None
        raise
    finally:
        if temp is not None:
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
