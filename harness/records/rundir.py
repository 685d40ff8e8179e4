"""The output folder of a run: one run at a time, and an earlier run replaced only once the new one works.

- :class:`FolderLock` takes an advisory lock (``flock``) on ``FOLDER/.harness.lock`` for as long as a run
  writes there; a second run on the same folder is refused with one line naming the process that holds it.
  The kernel drops the lock when its process ends, however it ends, so a crashed run never blocks the next;
  a run that ends normally also removes the file, so the folder holds only the run's results.
- :class:`Replacement` moves an earlier run's files into a hidden ``FOLDER/.replaced-run`` instead of
  deleting them. :meth:`Replacement.commit` deletes them once the new run has loaded its model; until then
  (a model that fails to load, Ctrl-C, a crash) :meth:`Replacement.restore` puts them back.
- :class:`RunFolder` is the life of one run's folder, the same for ``harness bench`` and ``harness train``:
  lock it and recover what an interrupted run left aside; at the end put an earlier run back if the new one
  never committed, release the lock, and remove the folders the run created if it wrote nothing there.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from types import TracebackType

from harness.errors import HarnessError

LOCK_FILE = ".harness.lock"
REPLACED_FOLDER = ".replaced-run"


def first_missing(folder: Path) -> Path | None:
    """The outermost folder that making ``folder`` creates (None: it exists), to remove when the run cannot start.

    A name the system refuses (too long) cannot exist: it counts as missing, and making it fails in one line.
    """

    def missing(path: Path) -> bool:
        try:
            return not path.exists()
        except OSError:
            return True

    return next((path for path in (*reversed(folder.parents), folder) if missing(path)), None)


class FolderLock:
    """An exclusive advisory lock on a run folder (created if missing), held until :meth:`release`."""

    def __init__(self, folder: Path, option: str, kind: str = "output folder"):
        self.folder = Path(folder)
        self.option = option  # the option that names the folder, for the message: --outdir, --output_dir
        self.kind = kind
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as error:
            raise HarnessError(f"cannot write to {self.kind} '{self.folder}': {error.strerror or error}; pass a "
                               f"writable {self.option}.") from None
        try:
            _lock(fd)
        except BlockingIOError:
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise HarnessError(f"'{self.folder}' is in use by another harness run ({holder}); wait for it to end or "
                               f"pass another {self.option}.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {platform.node()}: {' '.join(sys.argv[:3])}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)  # while still held: no one else can be using it
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def _lock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded against each other there
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class Replacement:
    """An earlier run's files moved aside inside its folder, to delete or to put back.

    ``names`` limits it to the files a run writes (a training run keeps the run folders of its earlier stages
    beside them, which the new run needs; a bench run's folder may be a user's project folder): the names, or a
    test of a name. By default it is everything in the folder but the lock.
    """

    def __init__(self, folder: Path, names: Collection[str] | Callable[[str], bool] | None = None):
        self.folder = Path(folder)
        self.owns = (lambda _: True) if names is None else names if callable(names) else frozenset(names).__contains__
        self.aside = self.folder / REPLACED_FOLDER
        self.pending = False

    def _entries(self) -> list[Path]:
        """The run's own entries in the folder now (the new run's, once the earlier one is aside)."""
        found = [entry for entry in self.folder.iterdir() if entry.name not in (LOCK_FILE, REPLACED_FOLDER)]
        return [entry for entry in found if self.owns(entry.name)]

    def recover(self) -> str | None:
        """Put back an earlier run that an --overwrite run killed before it could commit or restore left aside;
        the notice to show the user when it did."""
        if not self.aside.exists():
            return None
        self.restore()
        return f"Restored the earlier run in '{self.folder}' that an interrupted --overwrite run had moved aside."

    def move_aside(self) -> Replacement:
        """Move the run's files into the hidden folder."""
        if self.aside.exists():  # left by a run that was killed before it could commit or restore
            self.restore()
        self.aside.mkdir()
        for entry in self._entries():
            entry.rename(self.aside / entry.name)
        self.pending = True
        return self

    def commit(self) -> None:
        """The new run works: the earlier one goes for good."""
        if self.pending:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.pending = False

    def restore(self) -> None:
        """The new run never got going: remove what it wrote and put the earlier run back."""
        for entry in self._entries():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        for entry in self.aside.iterdir():
            entry.rename(self.folder / entry.name)
        self.aside.rmdir()
        self.pending = False


class RunFolder:
    """One run's folder from lock to release (``harness bench`` and ``harness train`` alike).

    ``owned`` names the entries a run writes (what ``--overwrite`` moves aside); ``notify`` receives the lines a
    user should read. Call :meth:`acquire` in the process that writes (the main one), then ``replacement``
    moves an earlier run aside or commits; :meth:`release` ends it, whatever happened.
    """

    def __init__(self, folder: Path, option: str, owned: Collection[str] | Callable[[str], bool],
                 notify: Callable[[str], None], kind: str = "output folder"):
        self.folder = Path(folder)
        self.lock = FolderLock(self.folder, option, kind)
        self.replacement = Replacement(self.folder, owned)
        self.created = first_missing(self.folder)  # the outermost folder this run makes, if any
        self.notify = notify

    def acquire(self) -> RunFolder:
        """Lock the folder (one run at a time) and put back an earlier run an interrupted one left aside."""
        self.lock.acquire()
        notice = self.replacement.recover()
        if notice is not None:
            self.notify(notice)
        return self

    def release(self, kept: str | None = None) -> None:
        """Put an earlier run back if the new one never committed (saying ``kept`` when given), then unlock."""
        if self.replacement.pending:
            self.replacement.restore()
            if kept is not None:
                self.notify(kept)
        self.lock.release()

    def remove_created(self) -> None:
        """Remove the folders this run created, with whatever it wrote: it could not start."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    def remove_if_empty(self) -> None:
        """Remove the run folder and its parents up to the first one this run created while they are empty:
        a run that wrote nothing leaves no empty folder behind, and one that wrote something keeps it."""
        if self.created is None:
            return
        for path in (self.folder, *self.folder.parents):
            try:
                path.rmdir()
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return  # it holds something: it and the folders above it stay
                # never made (gone, or a name the system refuses): its parent may still be this run's, and empty
            if path == self.created:
                return
