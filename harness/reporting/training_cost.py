"""What a LoRA cost to train: the ``harness train`` run folder behind it, found from the LoRA's location, and
the steps and seconds its log holds up to that checkpoint."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from harness.records.training_run import TrainingRun
from harness.reporting.runs import Run

# What harness.training.trainer writes into a training run folder (not imported: it pulls in accelerate).
# A LoRA lies at RUN/lora/final or RUN/lora/checkpoint-N: its training run is at most this many folders up.
RUN_FOLDER_LEVELS = 2
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_FINAL = "final"


@dataclass(frozen=True)
class TrainingCost:
    """What the ``harness train`` run behind a LoRA cost, up to the checkpoint the LoRA is."""

    run_dir: str
    trainer: str | None
    steps: int | None  # optimizer steps
    seconds: float | None  # training time (train_log.jsonl's ``seconds``, across resumes)

    @property
    def minutes(self) -> float | None:
        return None if self.seconds is None else self.seconds / 60

    @property
    def steps_per_s(self) -> float | None:
        if self.steps is None or not self.seconds:
            return None
        return self.steps / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "trainer": self.trainer, "steps": self.steps, "seconds": self.seconds,
                "minutes": self.minutes, "steps_per_s": self.steps_per_s}


def _lora_folder(location: str) -> PurePath:
    path = PurePath(location)
    return path.parent if path.suffix == ".safetensors" else path


def lora_name(location: str) -> str:
    """A short name for a LoRA: RUN for ``.../RUN/lora/final``, ``RUN checkpoint-N`` for a checkpoint of it,
    else the last part of the path or hub id."""
    path = _lora_folder(location)
    if (path.name == _FINAL or _CHECKPOINT.fullmatch(path.name)) and len(path.parts) >= 3:
        run = path.parent.parent.name
        return run if path.name == _FINAL else f"{run} {path.name}"
    return path.name or location


def _candidates(location: str, run: Run) -> list[Path]:
    """Where a LoRA location from a record may be now: as written, and, for a relative one, also from the folder
    the run was started in (found by taking the run's recorded --outdir off the run folder's path)."""
    path = Path(location).expanduser()
    found = [path]
    outdir = next((record.config.get("outdir") for record in run.records), None)
    if not path.is_absolute() and isinstance(outdir, str) and not Path(outdir).is_absolute():
        folder = run.folder.resolve()
        parts = Path(outdir).parts
        if parts and folder.parts[-len(parts):] == parts:
            found.append(Path(*folder.parts[:-len(parts)]) / path)
    return found


def find_training_run(location: str, run: Run) -> Path | None:
    """The ``harness train`` run folder a LoRA lies in (it holds train_log.jsonl, or a config.json naming a
    trainer), looking at most RUN_FOLDER_LEVELS folders up from the LoRA's own; None when there is none."""
    try:
        for candidate in _candidates(location, run):
            folder = candidate.parent if candidate.suffix == ".safetensors" else candidate
            if not folder.is_dir():
                continue
            for level in (folder, *folder.parents[:RUN_FOLDER_LEVELS]):
                if TrainingRun.holds_run(level):
                    return level
    except (OSError, RuntimeError):  # a location no folder can have: a name too long, '~user' of no user
        pass
    return None


def training_cost(location: str, run: Run) -> TrainingCost | None:
    """The cost of the training run behind a LoRA: up to its checkpoint-N, or the whole run for ``final``."""
    folder = find_training_run(location, run)
    if folder is None:
        return None
    logged = TrainingRun(folder).step_seconds()
    checkpoint = _CHECKPOINT.fullmatch(_lora_folder(location).name)
    steps: int | None
    seconds: float | None
    if checkpoint is not None:
        steps = int(checkpoint.group(1))
        seconds = next((s for step, s in reversed(logged) if step == steps), None)
    elif logged:
        steps, seconds = logged[-1]
    else:
        steps, seconds = None, None
    return TrainingCost(str(folder), TrainingRun(folder).trainer(), steps, seconds)


