"""The files of a ``harness train`` run folder, and the one reader of them.

The trainer writes them; the leaderboard (a LoRA's training cost), pretrain's model card and the pretrain
sweep read them back through :class:`TrainingRun`. Nothing here imports torch or accelerate, so a reader
never pays for the training stack.

A run folder ``OUTPUT_DIR/RUN_NAME`` holds ``config.json`` (the trainer, its resolved settings, the
environment), ``train_log.jsonl`` (one JSON object per logged step: ``step``, ``loss``, ``lr``,
``seconds``...), ``validation/`` (grids), ``trackers/`` (what ``--report_to`` wrote) and the trainer's
weights folder (``checkpoint-N/``, ``final/``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
LOG_FILE = "train_log.jsonl"
VALIDATION_FOLDER = "validation"
TRACKERS_FOLDER = "trackers"


def json_objects(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSON-lines file that are whole JSON objects; a line torn by a kill, or damaged, is passed
    over, and a file that cannot be read gives none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    found = []
    for line in data.splitlines():
        entry = _object(line)
        if entry is not None:
            found.append(entry)
    return found


def logged_step(line: bytes) -> int | None:
    """The step of one train_log.jsonl line; None for a line that is not one (torn by a kill, or damaged)."""
    entry = _object(line)
    step = entry.get("step") if entry is not None else None
    return step if _whole_number(step) else None


class TrainingRun:
    """A ``harness train`` run folder, read: its config, its trainer and its logged steps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def holds_run(folder: Path) -> bool:
        """Whether ``folder`` is a run folder: it holds train_log.jsonl, or a config.json naming a trainer."""
        return (folder / LOG_FILE).is_file() or TrainingRun(folder).trainer() is not None

    def config(self) -> dict[str, Any] | None:
        """config.json, or None where it is missing or not a JSON object."""
        path = self.folder / CONFIG_FILE
        try:
            document = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None
        return document if isinstance(document, dict) else None

    def trainer(self) -> str | None:
        """The trainer plugin that made the run, as config.json names it."""
        trainer = (self.config() or {}).get("trainer")
        return trainer if isinstance(trainer, str) else None

    def log(self) -> list[dict[str, Any]]:
        """The whole lines of train_log.jsonl that name a step, in file order."""
        return [entry for entry in json_objects(self.folder / LOG_FILE) if _whole_number(entry.get("step"))]

    def step_seconds(self) -> list[tuple[int, float]]:
        """(step, seconds since the run's start) of every logged step whose figures are numbers in float range."""
        found = []
        for entry in self.log():
            step, seconds = entry["step"], entry.get("seconds")
            # A step beyond the float range could be neither shown nor divided by the seconds.
            if 0 <= step <= sys.float_info.max and isinstance(seconds, (int, float)) \
                    and not isinstance(seconds, bool) and abs(seconds) <= sys.float_info.max:
                found.append((step, float(seconds)))
        return found


def _object(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return entry if isinstance(entry, dict) else None


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
