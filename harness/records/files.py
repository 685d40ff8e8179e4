"""Crash-safe file writing: every file lands whole under its name, or not at all.

Each file is written to a temporary name beside it and renamed into place; a folder is filled under a
hidden staging name and renamed. No reader ever sees half a file. Nothing here imports torch.
"""

from __future__ import annotations

import errno
import logging
import os
import re
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


# The hidden folders write_folder_atomic makes beside TARGET: ``.TARGET.tmp-PID-TAG`` while it is filled,
# ``.TARGET.new-PID-TAG`` once it is whole, ``.TARGET.old-PID-TAG`` for the version it replaces.
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<pid>\d+)-[0-9a-f]{8}")
_log = logging.getLogger("harness")


def write_folder_atomic(target: Path, write: Callable[[Path], None], keep_existing: bool = False,
                        notify: Callable[[str], None] | None = None) -> Path:
    """Fill a hidden staging folder beside ``target`` with ``write``, then rename it to ``target``.

    A process killed while writing leaves only the hidden folder, which no reader picks up. An existing
    ``target`` is replaced, unless ``keep_existing``: then the folder already there wins (a cache another
    process filled first) and the staged copy is discarded.

    Replacing takes two renames (the old version aside, the new one in). A process killed at any point leaves
    hidden folders that the next write of ``target`` (or :func:`recover_folders` on its parent) settles first: a new
    version that was whole is put in place, otherwise the old one is put back, and what is left is removed; each
    of these is told through ``notify`` (default: the ``harness`` logger).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(target, notify, keep_existing)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.parent / f".{target.name}.tmp-{tag}"
    ready = target.parent / f".{target.name}.new-{tag}"
    staging.mkdir()
    try:
        write(staging)
        staging.rename(ready)  # whole from here on: an interrupted replacement is finished, not undone
        if not target.exists():
            try:
                ready.rename(target)
            except OSError:
                if not (keep_existing and target.is_dir()):  # lost a race to another writer
                    raise
        elif not keep_existing:
            retired = target.parent / f".{target.name}.old-{tag}"
            target.rename(retired)
            ready.rename(target)
            shutil.rmtree(retired)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(ready, ignore_errors=True)
    return target


def recover_folders(parent: Path, notify: Callable[[str], None] | None = None) -> None:
    """Settle every folder in ``parent`` whose replacement a killed process left unfinished (see
    :func:`recover_folder`)."""
    parent = Path(parent)
    try:
        names = {match["name"] for path in parent.iterdir() if (match := _LEFTOVER.fullmatch(path.name))}
    except OSError:  # no such folder (yet), or not one
        return
    for name in sorted(names):
        recover_folder(parent / name, notify)


def recover_folder(target: Path, notify: Callable[[str], None] | None = None, keep_existing: bool = False) -> None:
    """Finish or undo what a killed :func:`write_folder_atomic` of ``target`` left beside it, and say so.

    Only the leftovers of processes that are no longer running on this machine are touched. A whole new version
    (``.new-``) is put in place; without one, a version moved aside (``.old-``) is put back; every other leftover
    (a half-filled staging folder, an old version already replaced) is removed.
    """
    target = Path(target)
    tell = notify or _log.warning
    try:
        found = [(match["kind"], path) for path in target.parent.iterdir()
                 if (match := _LEFTOVER.fullmatch(path.name)) and match["name"] == target.name
                 and not _running(int(match["pid"]))]
    except OSError:
        return
    if not found:
        return
    newest = {kind: max((path for k, path in found if k == kind), key=_mtime, default=None) for kind in ("new", "old")}
    if newest["new"] is not None and not (keep_existing and target.exists()):
        if target.exists():
            retired = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(retired)
            found.append(("old", retired))
        newest["new"].rename(target)
        tell(f"Finished replacing '{target}': a run killed while it replaced the folder had left the new version, "
             "whole, in a hidden folder beside it.")
    elif newest["old"] is not None and not target.exists():
        newest["old"].rename(target)
        tell(f"Restored '{target}': a run killed while it replaced the folder had moved it to a hidden folder "
             "beside it, and left no whole new version.")
    left = [path for _, path in found if path.exists()]
    if left:
        size = sum(_size(path) for path in left)
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        tell(f"Removed {len(left)} hidden folder(s) ({size / 1e6:.1f} MB) that an interrupted run left beside "
             f"'{target}', e.g. '{left[0].name}'.")


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this one included): its leftovers may still be in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number this system cannot check: leave its folders alone
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return sum(file.lstat().st_size for file in path.rglob("*"))
    except OSError:
        return 0


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as temp:
        # A folder name that is not UTF-8 reaches the text as lone surrogates ('\udcff'): they are written escaped,
        # as the text \udcff, rather than failing the whole file.
        temp.write_text(text, encoding="utf-8", errors="backslashreplace")


def save_image_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
