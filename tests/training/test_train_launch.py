"""Training through the launchers users run: `accelerate launch` with two processes, and the seed's scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import record_json
from tests.training.test_train_data import write_shapes

# Real training, several processes or a real model per test: not part of the fast subset.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ("--model", "embedded", "--teacher_steps", "2", "--seed", "1")


def _run(command, **kwargs):
    # One thread per process: two processes on a small CPU otherwise fight over the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, env=env, timeout=300,
                            **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, embedded_model):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=6)


def test_accelerate_launch_trains_with_two_processes_and_only_the_main_one_writes(shapes, tmp_path):
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "harness", "train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path,
          "--max_steps", "4", "--checkpointing_steps", "2", "--grad_accum", "2", *TINY])
    run = tmp_path / "lora_student"
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2
    assert resolved["effective_batch_size"] == 4  # batch 1 x 2 micro-batches x 2 processes
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    state = json.loads((run / "lora" / "checkpoint-4" / "training_state.json").read_text())
    assert state["samples_seen"] == 16 and sorted(state["rng"]) == ["0", "1"]  # both processes' RNG kept
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]


def test_train_lora_sh_takes_the_seeds_arguments(shapes, tmp_path):
    _run(["bash", REPO / "scripts" / "train_lora.sh", "--data_dir", shapes, "--output_dir", tmp_path,
          "--run_name", "my_lora_student", "--max_steps", "2", "--batch_size", "1", "--grad_accum", "2",
          "--student_steps", "2 4", *TINY])
    config = json.loads((tmp_path / "my_lora_student" / "config.json").read_text())["config"]
    assert (config["gradient_accumulation_steps"], config["student_steps"]) == (2, [2, 4])
    weights = tmp_path / "my_lora_student" / "lora" / "final" / "pytorch_lora_weights.safetensors"
    with safe_open(weights, "pt") as lora:
        assert any(key.startswith("unet.") for key in lora.keys())


def test_eval_lora_sh_splits_the_seeds_quoted_steps(tmp_path):
    from harness.models.embedded import embedded_lora

    _run(["bash", REPO / "scripts" / "eval_lora.sh", "--lora_path", embedded_lora(), "--model", "embedded",
          "--prompt", "a red circle", "--steps", "2 4", "--seed", "42", "--outdir", tmp_path / "eval",
          "--warmup", "0", "--repeats", "1"])
    measured = [(r["sampler"], r["steps"]) for r in record_json(tmp_path / "eval")]
    assert measured == [("vanilla-sd", 30), ("local-student", 2), ("local-student", 4)]
