"""Training failures stop with one line and leave the last checkpoint intact."""

import pytest
import torch
from harness_plugins.distill import DistillTrainer

from tests.conftest import invoke
from tests.training.test_train_data import write_shapes

FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--checkpointing_steps", "2")


@pytest.fixture
def shapes(tmp_path):
    return write_shapes(tmp_path / "data", count=4)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, shapes, embedded_model, monkeypatch):
    real_loss = DistillTrainer.compute_loss
    calls = []

    def loss_turning_nan(self, batch, generator):
        calls.append(1)
        loss = real_loss(self, batch, generator)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(DistillTrainer, "compute_loss", loss_turning_nan)
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--max_steps", "6",
                    "--output_dir", tmp_path / "out", *FAST)
    assert result.exit_code == 2
    lora = tmp_path / "out" / "lora_student" / "lora"
    assert (f"Error: the loss became nan at step 3; lower --learning_rate or --max_grad_norm, or train with "
            f"--mixed_precision no. The last checkpoint, '{lora / 'checkpoint-2'}', is intact: continue with "
            "--resume_from_checkpoint latest.") in result.output
    assert sorted(p.name for p in lora.iterdir()) == ["checkpoint-2"]  # no final/ from broken weights


def test_cuda_out_of_memory_gives_the_seeds_advice(tmp_path, shapes, embedded_model, monkeypatch):
    def out_of_memory(self, batch, generator):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DistillTrainer, "compute_loss", out_of_memory)
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--max_steps", "2",
                    "--output_dir", tmp_path / "out", *FAST)
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error.startswith("Error: CUDA out of memory at step 1: reduce --batch_size to 1")
    assert "--gradient_checkpointing" in error and "--resolution 256" in error
    assert error.endswith("No checkpoint was written yet.")


def test_skipped_examples_are_reported_and_training_goes_on(tmp_path, shapes, embedded_model):
    (shapes / "000.txt").unlink()
    (shapes / "001.png").write_bytes(b"not an image")
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--max_steps", "1",
                    "--output_dir", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert f"skipped 1 image(s) without a caption file, e.g. '{shapes / '000.png'}'" in result.output
    assert f"skipped 1 unreadable image(s), e.g. '{shapes / '001.png'}'" in result.output
    assert (tmp_path / "out" / "lora_student" / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_latest_ends_with_the_uninterrupted_weights(tmp_path, shapes, embedded_model):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    common = ["train", "--plugin", "distill", "--data_dir", str(shapes), "--max_steps", "16",
              "--output_dir", str(tmp_path), *FAST]
    assert invoke(*common, "--run_name", "straight").exit_code == 0

    process = subprocess.Popen([sys.executable, "-m", "harness", *common, "--run_name", "killed"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lora = tmp_path / "killed" / "lora"
    deadline = time.monotonic() + 180
    while not (lora / "checkpoint-6").is_dir():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (lora / "final").exists()

    result = invoke(*common, "--run_name", "killed", "--resume_from_checkpoint", "latest")
    assert result.exit_code == 0, result.output
    straight = load_file(tmp_path / "straight" / "lora" / "final" / "pytorch_lora_weights.safetensors")
    resumed = load_file(lora / "final" / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
