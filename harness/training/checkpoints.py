"""Checkpoint folders, written whole or not at all, and the training state inside them.

The seed's layout: ``RUN/lora/checkpoint-500``, ``checkpoint-1000``, ..., ``final/``. A checkpoint holds the
trainer's inference weights (a LoRA trainer's ``pytorch_lora_weights.safetensors``, so ``--lora_path`` takes a
checkpoint too) and what resuming needs:

- ``training_state.safetensors``: trainable parameters at full precision, optimizer tensors, RNG states and
  the trainer's own state (``extra.``: what its ``extra_state()`` returns, e.g. lcm's EMA target weights);
- ``training_state.json``: step, samples seen, seed, optimizer hyper-parameters, lr-scheduler and
  grad-scaler state, Python and NumPy RNG states, and the files the trainer's weights were saved as.

Nothing is pickled, so resuming from a checkpoint someone else wrote cannot run their code. Everything a
resumed run reads is checked first (:func:`load_resumable`): a torn or damaged checkpoint is a
:class:`CheckpointError` that names it and what is wrong, so ``latest`` can pass over it to an earlier one.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError, one_line
from harness.models import lora_io
from harness.records.files import write_folder_atomic
from harness.training.state import Progress, RunState

STATE_TENSORS = "training_state.safetensors"
STATE_INFO = "training_state.json"
#: training_state.json's list of the files save_weights() wrote, checked when resuming.
WEIGHTS_FILES = "weights_files"
FINAL = "final"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_OPTIMIZER_TENSOR = re.compile(r"optimizer\.\d+\..+")
# Mersenne Twister states: NumPy keeps 624 words, Python 624 and the position.
_MT_WORDS = 624


class CheckpointError(HarnessError):
    """A checkpoint that cannot be resumed from; ``problem`` says what is wrong, for a notice that passes over it."""

    def __init__(self, folder: Path, problem: str):
        super().__init__(f"'{folder}' is not a complete training checkpoint ({problem}); pass a checkpoint-N folder "
                         "written by harness train, or --resume_from_checkpoint latest.")
        self.folder, self.problem = folder, problem


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def completed_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(path.name)
        if match and (path / STATE_INFO).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = completed_checkpoints(folder)
    return checkpoints[-1][1] if checkpoints else None


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; return what was deleted."""
    doomed = [path for _, path in completed_checkpoints(folder)[:-keep]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


@dataclass
class TrainingState:
    """What a checkpoint holds for resuming: named tensors plus JSON-serialisable values."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        # safetensors wants contiguous tensors that share no memory.
        save_file({name: t.detach().contiguous().cpu().clone() for name, t in self.tensors.items()},
                  folder / STATE_TENSORS)
        (folder / STATE_INFO).write_text(json.dumps(self.info, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> TrainingState:
        """The tensors and info a checkpoint holds; a missing, torn or unreadable file is a CheckpointError."""
        missing = [name for name in (STATE_INFO, STATE_TENSORS) if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(folder, "no " + " / ".join(missing))
        return cls(_read_tensors(folder), _read_info(folder))

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix``, with the prefix removed."""
        return {name[len(prefix) :]: t for name, t in self.tensors.items() if name.startswith(prefix)}


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    # The header is checked first: safetensors maps the file, and a mapped file that ends early kills the process.
    try:
        lora_io.safetensors_header(folder / STATE_TENSORS)
    except ValueError as error:
        raise CheckpointError(folder, str(error)) from None
    try:
        return load_file(folder / STATE_TENSORS)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(folder, f"{STATE_TENSORS} cannot be read ({one_line(error)})") from None


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        info = json.loads((folder / STATE_INFO).read_bytes().decode("utf-8"))
    except OSError as error:
        raise CheckpointError(folder, f"cannot read {STATE_INFO}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise CheckpointError(folder, f"{STATE_INFO} is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(folder, f"{STATE_INFO} is not JSON (cut short, or not written by harness)") from None
    if not isinstance(info, dict):
        raise CheckpointError(folder, f"{STATE_INFO} is not a JSON object")
    return info


def load_resumable(folder: Path) -> TrainingState:
    """A checkpoint's state, checked to hold everything a resumed run reads, each value of the type it must have,
    and the weight files it lists: a wrong value is a CheckpointError naming it, not an error deep in the restore."""
    state = TrainingState.load(folder)
    problem = _info_problem(state.info) or _tensors_problem(state) or _weights_problem(folder, state.info)
    if problem is not None:
        raise CheckpointError(folder, problem)
    return state


def newest_resumable(folder: Path, on_skip: Callable[[CheckpointError], None]) -> tuple[Path, TrainingState] | None:
    """The newest checkpoint in ``folder`` that :func:`load_resumable` accepts, with its state; every newer one
    is passed to ``on_skip``. None when there is none."""
    for _, path in reversed(completed_checkpoints(folder)):
        try:
            return path, load_resumable(path)
        except CheckpointError as error:
            on_skip(error)
    return None


def _whole(value: object, low: int = 0, high: float = math.inf) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optimizer_info(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    groups, scalars = value.get("param_groups"), value.get("scalars")
    return (isinstance(groups, list) and all(isinstance(group, dict) and _number(group.get("lr"))
                                             and isinstance(group.get("params"), list)
                                             and all(_whole(index) for index in group["params"]) for group in groups)
            and isinstance(scalars, dict)
            and all(key.isdigit() and isinstance(values, dict) for key, values in scalars.items()))


def _scheduler_info(value: object) -> bool:
    return (isinstance(value, dict) and _whole(value.get("last_epoch"), -1)
            and isinstance(value.get("base_lrs"), list) and all(_number(lr) for lr in value["base_lrs"]))


def _words(value: object, count: int) -> bool:
    return isinstance(value, list) and len(value) == count and all(_whole(word, 0, 2**32) for word in value)


def _rng_info(value: object) -> bool:
    """Random states by process rank, in the form ``rng_to_state`` writes and ``restore_rng`` reads."""
    def one(state: object) -> bool:
        if not isinstance(state, dict):
            return False
        numpy, python = state.get("numpy"), state.get("python")
        return (_whole(state.get("cuda_devices"))
                and isinstance(numpy, list) and len(numpy) == 5 and numpy[0] == "MT19937"
                and _words(numpy[1], _MT_WORDS) and _whole(numpy[2], 0, _MT_WORDS + 1) and _whole(numpy[3], 0, 2)
                and _number(numpy[4])
                and isinstance(python, list) and len(python) == 3 and _whole(python[0])
                and _words(python[1], _MT_WORDS + 1) and python[1][-1] <= _MT_WORDS
                and (python[2] is None or _number(python[2])))

    return isinstance(value, dict) and all(key.isdigit() and one(state) for key, state in value.items())


#: What a resumed run reads from training_state.json: each field, what it must be, and a test of that.
RESUME_FIELDS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "step": ("a whole number >= 0", _whole),
    "samples_seen": ("a whole number >= 0", _whole),
    "seconds": ("a number >= 0", lambda value: _number(value) and value >= 0),
    "seed": ("a whole number in [0, 2**32)", lambda value: _whole(value, 0, 2**32)),
    "world_size": ("a whole number >= 1", lambda value: _whole(value, 1)),
    "optimizer": ("an object of param_groups and scalars", _optimizer_info),
    "lr_scheduler": ("an object with last_epoch and base_lrs", _scheduler_info),
    "grad_scaler": ("an object or null", lambda value: value is None or isinstance(value, dict)),
    "rng": ("an object of random states by process", _rng_info),
}


def _info_problem(info: dict[str, Any]) -> str | None:
    for name, (expected, valid) in RESUME_FIELDS.items():
        if name not in info:
            return f"{STATE_INFO} has no '{name}'"
        if not valid(info[name]):
            return f"{STATE_INFO}: '{name}' is not {expected}"
    return None


def _tensors_problem(state: TrainingState) -> str | None:
    """Tensors the info promises: each process's random states, and optimizer state under its parameter index."""
    for rank, rng in state.info["rng"].items():
        cuda = [f"rng.{rank}.cuda.{device}" for device in range(rng["cuda_devices"])]
        for name in (f"rng.{rank}.generator", f"rng.{rank}.torch", *cuda):
            if name not in state.tensors or state.tensors[name].dtype != torch.uint8:
                return f"{STATE_TENSORS} has no random state '{name}'"
    odd = next((name for name in state.tensors
                if name.startswith("optimizer.") and not _OPTIMIZER_TENSOR.fullmatch(name)), None)
    return None if odd is None else f"{STATE_TENSORS} holds a tensor {odd[:100]!r} that is no optimizer state"


def _weights_problem(folder: Path, info: dict[str, Any]) -> str | None:
    """The files save_weights() wrote, as training_state.json lists them (checkpoints from before the list
    existed are not checked): each present, and a safetensors file whole."""
    files = info.get(WEIGHTS_FILES, [])
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return f"{STATE_INFO}: '{WEIGHTS_FILES}' is not a list of file names"
    for name in files:
        path = folder / name
        if "\0" in name or Path(name).is_absolute() or ".." in Path(name).parts or not path.is_file():
            return f"its weights file {name[:100]!r} is missing"
        if path.suffix == ".safetensors":
            try:
                lora_io.safetensors_header(path)
            except ValueError as error:
                return str(error)
    return None


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in info["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": info["param_groups"]}


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """This process's random states: the training generator, torch (CPU and CUDA), NumPy and Python."""
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def rng_to_state(rank: int, rng: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {f"{rank}.generator": rng["generator"], f"{rank}.torch": rng["torch"]}
    tensors.update({f"{rank}.cuda.{device}": state for device, state in enumerate(rng["cuda"])})
    name, keys, position, has_gauss, cached_gauss = rng["numpy"]
    version, python_state, python_gauss = rng["python"]
    info = {
        "cuda_devices": len(rng["cuda"]),
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gauss],
        "python": [version, list(python_state), python_gauss],
    }
    return tensors, info


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], info: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(tensors[f"{rank}.generator"])
    torch.set_rng_state(tensors[f"{rank}.torch"])
    if torch.cuda.is_available() and info["cuda_devices"] == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[f"{rank}.cuda.{d}"] for d in range(info["cuda_devices"])])
    name, keys, position, has_gauss, cached_gauss = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gauss))
    version, python_state, python_gauss = info["python"]
    random.setstate((version, tuple(python_state), python_gauss))


def snapshot(run: RunState, rng_by_rank: list[Any], extra: dict[str, torch.Tensor], *, trainer: str, seed: int,
             world_size: int, scaler: Any) -> TrainingState:
    """Everything a resumed run needs besides the trainer's weights: the trainable tensors, the optimizer, the
    schedule, the gradient scaler, every process's random generators, the trainer's own extra state and the
    progress."""
    state = TrainingState()
    state.tensors.update({f"param.{name}": p for name, p in run.trainable.items()})
    optimizer_tensors, optimizer_info = flatten_optimizer(run.optimizer.state_dict())
    state.tensors.update({f"optimizer.{name}": t for name, t in optimizer_tensors.items()})
    state.tensors.update({f"extra.{name}": t for name, t in extra.items()})
    rng_info = {}
    for rank, rng in enumerate(rng_by_rank):
        rng_tensors, rng_info[str(rank)] = rng_to_state(rank, rng)
        state.tensors.update({f"rng.{name}": t for name, t in rng_tensors.items()})
    progress = run.progress
    state.info = {
        "step": progress.step,
        "samples_seen": progress.samples_seen,
        "seconds": progress.seconds,
        "seed": seed,
        "world_size": world_size,
        "trainer": trainer,
        "optimizer": optimizer_info,
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_info,
    }
    return state


def write(state: TrainingState, folder: Path, save_weights: Callable[[Path], None]) -> None:
    """A checkpoint folder, whole or not at all: the trainer's weights, then the state that lists them."""

    def fill(staging: Path) -> None:
        save_weights(staging)
        # Listed so a resumed run can tell a checkpoint whose weights were lost or cut short.
        state.info[WEIGHTS_FILES] = sorted(
            path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        state.save(staging)

    write_folder_atomic(folder, fill)


def restore(state: TrainingState, folder: Path, run: RunState, rank: int, scaler: Any,
            load_extra: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Put a checkpoint's state back into ``run`` (and the trainer's extra state through ``load_extra``); a state
    that does not fit this run is one line naming the settings to resume with."""
    info, trainable = state.info, run.trainable
    saved = state.with_prefix("param.")
    mismatched = {name for name, p in trainable.items() if name not in saved or saved[name].shape != p.shape}
    if mismatched or len(saved) != len(trainable):
        raise HarnessError(
            f"checkpoint '{folder}' holds other trainable weights than this run has "
            f"(e.g. '{sorted(mismatched or set(saved) - set(trainable))[0]}'); resume with "
            "the settings it was trained with (--lora_rank, --lora_target_modules, --model)."
        )
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(saved[name])
    load_extra(state.with_prefix("extra."))
    # load_resumable checked the form of each part; torch's own loaders still refuse what does not fit this
    # run's optimizer, schedule or generator (another number of parameter groups, another device's RNG).
    try:
        run.optimizer.load_state_dict(unflatten_optimizer(state.with_prefix("optimizer."), info["optimizer"]))
        run.lr_scheduler.load_state_dict(info["lr_scheduler"])
        if info["grad_scaler"] is not None and scaler is not None:
            scaler.load_state_dict(info["grad_scaler"])
        if str(rank) in info["rng"]:
            restore_rng(rank, state.with_prefix("rng."), info["rng"][str(rank)], run.generator)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as error:
        raise HarnessError(f"checkpoint '{folder}' does not fit this run ({one_line(error)}); resume with the "
                           "settings it was trained with.") from None
    run.progress = Progress(info["step"], info["samples_seen"], info["seconds"])


def resume_point(request: str | None, checkpoint_dir: Path, overwrite: bool,
                 notify: Callable[[str], None]) -> tuple[Path, TrainingState] | None:
    """The checkpoint ``--resume_from_checkpoint`` asks for and its checked state; None to start a new run.

    ``latest`` passes over damaged checkpoints, each named in a notice; a named folder that is damaged is one
    line, as the user asked for that very state.
    """
    if request == "latest":
        damaged: list[CheckpointError] = []

        def skip(error: CheckpointError) -> None:
            damaged.append(error)
            notify(f"skipped damaged checkpoint '{error.folder}': {error.problem}.")

        found = newest_resumable(checkpoint_dir, skip)
        if found is not None:
            return found
        if damaged and not overwrite:
            raise HarnessError(
                f"every checkpoint in '{checkpoint_dir}' is damaged (the newest, '{damaged[0].folder}': "
                f"{damaged[0].problem}); pass --overwrite to start the run again, or another --run_name."
            )
        usable = "usable " if damaged else ""
        notify(f"no {usable}checkpoint in '{checkpoint_dir}' yet; starting a new run.")
    elif request is not None:
        folder = Path(request).expanduser()
        if not folder.is_dir():
            raise HarnessError(
                f"--resume_from_checkpoint '{folder}' is not a folder; pass a checkpoint-N folder or 'latest'."
            )
        return folder, load_resumable(folder)
    return None
