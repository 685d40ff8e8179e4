"""Checkpoint folders: whole or absent, newest found, old ones pruned, state restored without pickle."""

import random

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.records.files import write_folder_atomic
from harness.training import checkpoints
from harness.training.checkpoints import TrainingState


def _complete(folder, step):
    path = folder / checkpoints.checkpoint_name(step)
    path.mkdir(parents=True)
    (path / checkpoints.STATE_INFO).write_text("{}")
    return path


def test_latest_ignores_half_written_and_incomplete_checkpoints(tmp_path):
    _complete(tmp_path, 20)
    newest = _complete(tmp_path, 100)
    (tmp_path / ".checkpoint-120.tmp-1-abc").mkdir()  # a run killed while writing
    (tmp_path / "checkpoint-140").mkdir()  # no training state: not a checkpoint
    assert checkpoints.latest_checkpoint(tmp_path) == newest
    assert checkpoints.latest_checkpoint(tmp_path / "absent") is None


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "final"
    write_folder_atomic(target, lambda folder: (folder / "weights").write_text("old"))

    def crash(folder):
        (folder / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder_atomic(target, crash)
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    write_folder_atomic(target, lambda folder: (folder / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_prune_keeps_the_newest(tmp_path):
    for step in (500, 1000, 1500):
        _complete(tmp_path, step)
    checkpoints.prune(tmp_path, keep=2)
    assert [step for step, _ in checkpoints.completed_checkpoints(tmp_path)] == [1000, 1500]


def _adamw_step(parameter, optimizer):
    optimizer.zero_grad()
    (parameter ** 2).sum().backward()
    optimizer.step()


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    for _ in range(3):
        _adamw_step(parameter, optimizer)
    tensors, info = checkpoints.flatten_optimizer(optimizer.state_dict())
    TrainingState({f"optimizer.{k}": v for k, v in tensors.items()}, {"optimizer": info}).save(tmp_path)
    loaded = TrainingState.load(tmp_path)

    copy = torch.nn.Parameter(parameter.detach().clone())
    restored = torch.optim.AdamW([copy], lr=0.5)
    restored.load_state_dict(
        checkpoints.unflatten_optimizer(loaded.with_prefix("optimizer."), loaded.info["optimizer"])
    )
    _adamw_step(parameter, optimizer)
    _adamw_step(copy, restored)
    assert torch.equal(parameter, copy)


def test_random_states_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.randn(4, generator=generator)
    tensors, info = checkpoints.rng_to_state(0, checkpoints.capture_rng(generator))
    TrainingState(tensors, {"rng": info}).save(tmp_path)
    expected = (torch.randn(3, generator=generator), torch.rand(2), np.random.rand(), random.random())

    loaded = TrainingState.load(tmp_path)
    other = torch.Generator().manual_seed(99)
    checkpoints.restore_rng(0, loaded.tensors, loaded.info["rng"], other)
    again = (torch.randn(3, generator=other), torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_loading_a_folder_that_is_not_a_checkpoint_says_so(tmp_path):
    with pytest.raises(HarnessError, match="not a complete training checkpoint"):
        TrainingState.load(tmp_path)
