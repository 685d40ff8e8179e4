"""Trainer plugins: the docs' guide trains, resumes and benchmarks; a class that breaks the contract is refused."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.hooks.registry import get_registry
from tests.conftest import invoke, record_json

TRAINER_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "trainers.md"
WEIGHTS = "pytorch_lora_weights.safetensors"


def guide_trainer_source() -> str:
    """The complete plugin shown in the trainer guide of the docs (docs/plugins/trainers.md): its first Python block."""
    page = TRAINER_GUIDE.read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", page, re.S).group(1)


@pytest.fixture
def plugin_dir(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "harness_finetune.py").write_text(guide_trainer_source(), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_the_guide_trainer_trains_resumes_exactly_and_benches(tmp_path, plugin_dir, embedded_model, monkeypatch):
    data = tmp_path / "shapes"
    assert invoke("data", "shapes", "--out", data, "--n", "4", "--seed", "0", "--resolution", "64").exit_code == 0
    train = ("--plugin-dir", plugin_dir, "train", "--plugin", "finetune", "--model", "embedded", "--data_dir", data,
             "--resolution", "64", "--batch_size", "2", "--grad_accum", "1", "--max_steps", "4",
             "--checkpointing_steps", "2", "--seed", "5", "--noise-offset", "0.1", "--output_dir", tmp_path)

    result = invoke(*train, "--run_name", "straight", "--validation_prompts", "a small red circle at the top on a "
                    "blue background", "--sample_steps", "2")
    assert result.exit_code == 0, result.output
    run = tmp_path / "straight"
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4] and all(math.isfinite(row["loss"]) for row in log)
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"] == "finetune" and config["config"]["noise_offset"] == 0.1
    assert config["resolved"]["prediction_type"] == "v_prediction"  # the embedded model's: the v target trained
    final = run / "lora" / "final"
    assert (final / WEIGHTS).is_file() and (run / "validation" / "step-000004.png").is_file()

    # Interrupted after step 3 was logged, before any checkpoint-4: resuming from checkpoint-2 must redo step 3.
    trainer_class = get_registry([plugin_dir]).trainer("finetune").cls

    def interrupt_at_step_3(self, report):
        if report.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_class, "on_step_end", interrupt_at_step_3)
    assert invoke(*train, "--run_name", "resumed").exit_code == 130
    monkeypatch.undo()
    result = invoke(*train, "--run_name", "resumed", "--resume_from_checkpoint", "latest")
    assert result.exit_code == 0, result.output
    resumed = tmp_path / "resumed"
    assert [json.loads(line)["step"] for line in (resumed / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    straight_weights, resumed_weights = load_file(final / WEIGHTS), load_file(resumed / "lora" / "final" / WEIGHTS)
    assert straight_weights.keys() == resumed_weights.keys()
    for key in straight_weights:
        torch.testing.assert_close(resumed_weights[key], straight_weights[key], rtol=0, atol=1e-6)

    result = invoke("bench", "--sampler", "local-student", "--model", "embedded", "--lora_path", final, "--steps", "2",
                    "--outdir", tmp_path / "bench", "--warmup", "0", "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    [record] = record_json(tmp_path / "bench")
    assert (record["sampler"], record["steps"], record["status"]) == ("local-student", 2, "ok")
    assert str(final) in record["sampler_info"]["lora"]


BROKEN = {
    "config_class": ("config_class = None\n\n    def compute_loss(self, batch, generator):\n        return None\n",
                     "config_class None, not a dataclass subclass of harness.training.config.TrainConfig"),
    "compute_loss": ("pass\n", "does not implement compute_loss"),
}


@pytest.mark.parametrize("missing", sorted(BROKEN))
def test_a_trainer_breaking_its_contract_is_a_broken_plugin_and_one_error_line(tmp_path, missing):
    body, reason = BROKEN[missing]
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "half_done.py").write_text(
        "import harness\nfrom harness.training import LoraTrainer\n\n\n"
        "class HalfDone(LoraTrainer):\n    name = 'half-done'\n    description = 'A trainer missing a part.'\n"
        f"    {body}\n\n@harness.hookimpl\ndef register_trainers(register):\n    register(HalfDone)\n",
        encoding="utf-8")

    rows = json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)
    [broken] = [row for row in rows if row["name"] == "half_done"]
    assert broken["kind"] == "broken" and reason in broken["description"]
    assert "half-done" not in {row["name"] for row in rows}

    result = invoke("--plugin-dir", folder, "train", "--plugin", "half-done", "--help")
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("Error: ") and "'half_done'" in line and reason in line, line
