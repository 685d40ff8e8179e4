"""Benchmark records (``records.jsonl``): appended whole, read back against the schema.

Each line of ``records.jsonl`` is one JSON object for one (sampler, steps) measurement; its fields are
documented in docs/reference/records.md. Lines are appended, flushed and fsynced one at a time, so a run
killed at any moment leaves only whole records; every other file is written to a temporary name and
renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, RecordError
from harness.records.schema import SCHEMA, Record  # noqa: F401 - SCHEMA is part of this module's interface

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.md"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_record(path: Path, record: Record) -> None:
    """Append one record as one line, flushed and fsynced: a crash leaves only whole lines before it.

    A write that fails part way (a full disk, a quota) is cut back off the file, so the file ends at its last
    whole line and the error is raised; a line torn by an earlier crash gets a line end first, so it stays a line
    of its own that readers name and skip, never the start of this record's line. A symlink in the record file's
    place is refused rather than followed, so records never land outside the run folder.
    """
    line = (json.dumps(record.to_json(), default=str) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError:
        if Path(path).is_symlink():
            raise HarnessError(f"'{path}' is a symbolic link; harness writes records only into a plain file inside "
                               "the run folder: remove the link or pass another --outdir.") from None
        raise
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            line = b"\n" + line
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # back to the last whole line: never half a record
            raise
    finally:
        os.close(fd)


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


def dump(records: Sequence[Record]) -> str:
    return json.dumps([record.to_json() for record in records], indent=2, default=str)

