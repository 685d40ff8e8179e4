"""`harness train --plugin lcm` on the embedded model: the loss falls, and local-student runs the LoRA."""

import json

import pytest

from harness.records import read_records
from tests.conftest import invoke
from tests.test_train_data import write_shapes

# One solver step (t = 999 to 0) and a fixed w take the timestep and guidance draws out of the loss's noise,
# so 20 steps at a high learning rate show the student learning the guided teacher.
STEPS = 20
FAST = ("--num_ddim_timesteps", "1", "--w_min", "2", "--w_max", "2", "--learning_rate", "3e-3",
        "--batch_size", "4", "--grad_accum", "1", "--seed", "7")


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_model):
    data = write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=8)
    output = tmp_path_factory.mktemp("runs")
    result = invoke("train", "--plugin", "lcm", "--model", "embedded", "--data_dir", data,
                    "--max_steps", STEPS, "--output_dir", output, "--run_name", "lcm", *FAST)
    assert result.exit_code == 0, result.output
    return output / "lcm"


def test_loss_falls(run):
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS
    early, late = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"lcm loss, mean of steps 1-5: {early:.4f}, of steps {STEPS - 4}-{STEPS}: {late:.4f}")
    assert late < 0.85 * early


def test_config_records_the_teacher_solver(run):
    config = json.loads((run / "config.json").read_text())
    assert config["trainer"] == "lcm"
    assert config["resolved"]["teacher_solver"] == "DDIM, 1 timesteps 1000 apart, w in [2, 2] (cfg scale 1 + w)"


def test_local_student_runs_the_final_lora(run, tmp_path):
    final = run / "lora" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    result = invoke("bench", "--sampler", "local-student", "--lora_path", final, "--steps", "2",
                    "--model", "embedded", "--outdir", tmp_path, "--warmup", "0", "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    records = read_records(tmp_path)
    assert [(r["sampler"], r["steps"], r["status"]) for r in records] == [("local-student", 2, "ok")]
    assert str(final) in records[0]["sampler_info"]["lora"]


def test_help_lists_the_lcm_options_with_their_defaults():
    result = invoke("train", "--plugin", "lcm", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in ("--num_ddim_timesteps", "[default: 50", "--w_min", "[default: 5.0", "--w_max",
                     "[default: 15.0", "--timestep_scaling_factor", "[default: 10.0", "--loss [huber|l2]",
                     "--huber_c", "[default: 0.001", "--lora_rank"):
        assert expected in text, expected


def test_w_min_above_w_max_is_refused(tmp_path):
    result = invoke("train", "--plugin", "lcm", "--data_dir", tmp_path, "--w_min", "9", "--w_max", "3")
    assert result.exit_code == 2
    assert "--w_min 9 is above --w_max 3." in result.output
