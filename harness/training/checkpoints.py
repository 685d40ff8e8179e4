"""Checkpoint folders, written whole or not at all, and the training state inside them.

The seed's layout: ``RUN/lora/checkpoint-500``, ``checkpoint-1000``, ..., ``final/``. A checkpoint holds the
trainer's inference weights (a LoRA trainer's ``pytorch_lora_weights.safetensors``, so ``--lora_path`` takes a
checkpoint too) and what resuming needs:

- ``training_state.safetensors``: trainable parameters at full precision, optimizer tensors, RNG states and
  the trainer's own state (``extra.``: what its ``extra_state()`` returns, e.g. lcm's EMA target weights);
- ``training_state.json``: step, samples seen, seed, optimizer hyper-parameters, lr-scheduler and
  grad-scaler state, Python and NumPy RNG states.

Nothing is pickled, so resuming from a checkpoint someone else wrote cannot run their code.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError

STATE_TENSORS = "training_state.safetensors"
STATE_INFO = "training_state.json"
FINAL = "final"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


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
        if not (folder / STATE_INFO).is_file() or not (folder / STATE_TENSORS).is_file():
            raise HarnessError(f"'{folder}' is not a complete training checkpoint (no {STATE_INFO} / {STATE_TENSORS}); "
                               "pass a checkpoint-N folder written by harness train, or --resume_from_checkpoint latest.")
        return cls(load_file(folder / STATE_TENSORS), json.loads((folder / STATE_INFO).read_text(encoding="utf-8")))

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``prefix``, with the prefix removed."""
        return {name[len(prefix):]: t for name, t in self.tensors.items() if name.startswith(prefix)}


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON values."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict:
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
    info = {"cuda_devices": len(rng["cuda"]),
            "numpy": [name, keys.tolist(), position, has_gauss, cached_gauss],
            "python": [version, list(python_state), python_gauss]}
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
