"""Benchmark records (``records.jsonl``): appended whole, read back against the schema.

Each line of ``records.jsonl`` is one JSON object for one (sampler, steps) measurement; its fields are
documented in docs/reference/records.md. Lines are appended, flushed and fsynced one at a time, so a run
killed at any moment leaves only whole records; every other file is written to a temporary name and
renamed into place, so no reader ever sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
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
# A run's prompts, once (a JSON list); each record names it and its digest in config, instead of repeating them.
PROMPTS_FILE = "prompts.json"


def prompts_digest(prompts: Sequence[str]) -> str:
    """The SHA-256 of the prompts as their JSON list (ASCII-escaped): equal digests, equal prompts in order."""
    return hashlib.sha256(json.dumps(list(prompts)).encode("ascii")).hexdigest()


def write_prompts(run_dir: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """Write the run's prompts file; the config fields that name it."""
    from harness.records.files import write_text_atomic

    write_text_atomic(Path(run_dir) / PROMPTS_FILE, json.dumps(list(prompts), indent=0) + "\n")
    return {"prompts_file": PROMPTS_FILE, "prompts_sha256": prompts_digest(prompts), "prompts_count": len(prompts)}


def prompts_key(config: dict[str, Any]) -> str | None:
    """What identifies a record's prompts: the digest it names, or (records before prompts files) the digest of
    the prompts it carries; None when it has neither."""
    digest = config.get("prompts_sha256")
    if isinstance(digest, str):
        return digest
    prompts = config.get("prompts")
    if isinstance(prompts, list) and all(isinstance(prompt, str) for prompt in prompts):
        return prompts_digest(prompts)
    return None


def read_prompts(run_dir: Path, config: dict[str, Any]) -> list[str] | None:
    """A record's prompts: from its run's prompts file when the digest matches, else those it carries (older
    records); None when neither is there."""
    name = config.get("prompts_file")
    if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
        try:
            prompts = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) \
                and prompts_digest(prompts) == config.get("prompts_sha256"):
            return prompts
        return None
    prompts = config.get("prompts")
    return prompts if isinstance(prompts, list) else None


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

