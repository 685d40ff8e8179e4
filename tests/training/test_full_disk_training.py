"""A full disk while training: one line naming the last intact checkpoint, never a traceback or a half checkpoint.

safetensors reports a full disk as its own error (``Error while serializing: I/O error: No space left on device
(os error 28)``), not as an OSError; both kinds are simulated here.
"""

import errno
import os

import pytest
from safetensors.torch import load_file

from harness.training import checkpoints
from tests.conftest import invoke
from tests.training.test_train_data import write_shapes

FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--checkpointing_steps", "1")
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=2)


def _train(shapes, output, *extra):
    return invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", output, "--run_name", "run",
                  *FAST, *extra)


@pytest.mark.parametrize("error", [RuntimeError(SAFETENSORS_FULL), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))])
def test_a_checkpoint_the_disk_cannot_take_is_one_line(tmp_path, shapes, embedded_model, monkeypatch, error):
    real_save = checkpoints.TrainingState.save
    saved = []

    def save_until_full(state, folder):
        if saved:  # the second checkpoint finds the disk full
            raise error
        saved.append(folder)
        real_save(state, folder)

    monkeypatch.setattr(checkpoints.TrainingState, "save", save_until_full)
    output = tmp_path / "out"
    result = _train(shapes, output, "--max_steps", "3")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lora = output / "run" / "lora"
    reason = os.strerror(errno.EDQUOT if error.args[0] == errno.EDQUOT else errno.ENOSPC)
    assert [line for line in result.output.splitlines() if line.startswith("Error:")] == [
        f"Error: cannot write to '{output / 'run'}': {reason}; free some space or pass --output_dir on another disk. "
        f"The last checkpoint, '{lora / 'checkpoint-1'}', is intact: continue with --resume_from_checkpoint latest."]
    # Nothing half-written: the staged checkpoint-2 is gone, checkpoint-1 is whole.
    assert sorted(path.name for path in lora.iterdir()) == ["checkpoint-1"]
    assert load_file(lora / "checkpoint-1" / "pytorch_lora_weights.safetensors")


def test_a_final_folder_the_disk_cannot_take_is_one_line(tmp_path, shapes, embedded_model, monkeypatch):
    from harness_plugins.distill import DistillTrainer

    def full(trainer, folder):
        raise RuntimeError(SAFETENSORS_FULL)

    output = tmp_path / "out"
    monkeypatch.setattr(DistillTrainer, "save_weights", full)
    result = _train(shapes, output, "--max_steps", "1", "--checkpointing_steps", "5")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot write to '{output / 'run'}': No space left on device; free some space or pass --output_dir on "
        "another disk. No checkpoint was written yet.")
    assert not (output / "run" / "lora").exists() or not list((output / "run" / "lora").iterdir())


def test_other_errors_while_saving_are_not_called_a_full_disk(tmp_path, shapes, embedded_model, monkeypatch):
    def broken(state, folder):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoints.TrainingState, "save", broken)
    with pytest.raises(PermissionError):  # a bug or a setup problem, not a full disk: it is not renamed one
        _train(shapes, tmp_path / "out", "--max_steps", "1")
