"""`harness train --plugin lcm` on the embedded model: the loss falls, and local-student runs the LoRA."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import invoke, record_json
from tests.training.test_train_data import write_shapes

# Real training, several processes or a real model per test: not part of the fast subset.
pytestmark = pytest.mark.slow

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
    # Measured on the shipped embedded model with LCM-LoRA's LoRA: 1.134 -> 0.820 (-28%); a student that learns
    # nothing stays flat.
    assert late < 0.9 * early


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
    records = record_json(tmp_path)
    assert [(r["sampler"], r["steps"], r["status"]) for r in records] == [("local-student", 2, "ok")]
    assert str(final) in records[0]["sampler_info"]["lora"]


def test_help_lists_the_lcm_options_with_their_defaults():
    result = invoke("train", "--plugin", "lcm", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in ("--num_ddim_timesteps", "[default: 50", "--w_min", "[default: 5.0", "--w_max",
                     "[default: 15.0", "--timestep_scaling_factor", "[default: 10.0", "--loss [huber|l2]",
                     "--huber_c", "[default: 0.001", "--lora_rank", "--use_target_model",
                     "--ema_decay", "[default: 0.95"):
        assert expected in text, expected


def test_the_lora_is_lcm_loras_by_default(run):
    """Rank 64 on LCM-LoRA's layers, written so that every layer loads (convolutions included)."""
    lora = json.loads((run / "config.json").read_text())["resolved"]["lora"]
    assert (lora["r"], lora["lora_alpha"]) == (64, 64)
    assert {"to_q", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv"} <= set(
        lora["target_modules"])
    keys = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors").keys()
    assert any(".resnets.0.conv1.lora.down." in key for key in keys)
    assert any(".attn1.to_q.lora.down." in key for key in keys)
    assert all(".lora.down." in key or ".lora.up." in key for key in keys)


def test_w_min_above_w_max_is_refused(tmp_path):
    result = invoke("train", "--plugin", "lcm", "--data_dir", tmp_path, "--w_min", "9", "--w_max", "3")
    assert result.exit_code == 2
    assert "--w_min 9 is above --w_max 3." in result.output


# ----- the EMA target (--use_target_model, --ema_decay) -----

# Tiny runs: 4 optimizer steps of 2 micro-batches each (the EMA moves once per optimizer step), a checkpoint
# at every step and a fixed w. Four solver steps, not one: a target at t = 0 is x itself (c_skip = 1, c_out = 0),
# whatever the target network.
EMA_STEPS = 4
TINY = ("--model", "embedded", "--max_train_samples", "4", "--max_steps", EMA_STEPS, "--batch_size", "1",
        "--grad_accum", "2", "--checkpointing_steps", "1", "--num_ddim_timesteps", "4", "--w_min", "2",
        "--w_max", "2", "--learning_rate", "3e-3", "--seed", "7")


@pytest.fixture(scope="module")
def ema_runs(tmp_path_factory, embedded_model):
    """Runs with the same seed and data: the plain target, the EMA target at 0.95 and at 0."""
    data = write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=4)
    output = tmp_path_factory.mktemp("runs")
    for name, options in (("online", ()), ("ema", ("--use_target_model",)),
                          ("ema0", ("--use_target_model", "--ema_decay", "0"))):
        result = invoke("train", "--plugin", "lcm", "--data_dir", data, "--output_dir", output,
                        "--run_name", name, *TINY, *options)
        assert result.exit_code == 0, result.output
    return data, output


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _state(run, step):
    return load_file(run / "lora" / f"checkpoint-{step}" / "training_state.safetensors")


def _with_prefix(tensors, prefix):
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def _assert_identical(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_ema_run_saves_the_online_lora_and_its_checkpoints_hold_the_ema(ema_runs):
    _, output = ema_runs
    run = output / "ema"
    assert json.loads((run / "config.json").read_text())["resolved"]["target_model"] == \
        "EMA of the LoRA weights, decay 0.95"
    assert json.loads((output / "online" / "config.json").read_text())["resolved"]["target_model"] == \
        "the trained LoRA without gradient (EMA decay 0)"
    assert (run / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()
    for step in range(2, EMA_STEPS + 1):
        before, after = _state(run, step - 1), _state(run, step)
        ema_before, ema, online = (_with_prefix(before, "extra.ema."), _with_prefix(after, "extra.ema."),
                                   _with_prefix(after, "param."))
        assert ema.keys() == online.keys() and ema
        for name in ema:  # one EMA update per optimizer step, not per micro-batch
            torch.testing.assert_close(ema[name], 0.95 * ema_before[name] + 0.05 * online[name])
        assert any(not torch.equal(ema[name], online[name]) for name in ema)
    # final/ holds the online LoRA: the same weights as the last checkpoint's, which trains them.
    _assert_identical(load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors"),
                      load_file(run / "lora" / f"checkpoint-{EMA_STEPS}" / "pytorch_lora_weights.safetensors"))
    assert not any(name.startswith("extra.") for name in _state(output / "online", 1))


def test_the_ema_target_changes_the_loss_from_step_2(ema_runs):
    _, output = ema_runs
    online, ema, ema0 = (_losses(output / name) for name in ("online", "ema", "ema0"))
    print(f"lcm losses, online target: {online}; EMA 0.95: {ema}; EMA 0: {ema0}")
    assert ema[0] == online[0]  # the EMA starts as a copy of the student
    assert ema[1] != online[1]
    assert ema0 == online  # decay 0: the target is the student itself


def test_resuming_an_ema_run_ends_bit_identical_to_the_uninterrupted_run(ema_runs):
    data, output = ema_runs
    straight = output / "ema"
    result = invoke("train", "--plugin", "lcm", "--data_dir", data, "--output_dir", output, "--run_name", "resumed",
                    *TINY, "--use_target_model", "--resume_from_checkpoint", straight / "lora" / "checkpoint-2")
    assert result.exit_code == 0, result.output
    assert "at step 2" in result.output
    resumed = output / "resumed"
    _assert_identical(load_file(straight / "lora" / "final" / "pytorch_lora_weights.safetensors"),
                      load_file(resumed / "lora" / "final" / "pytorch_lora_weights.safetensors"))
    _assert_identical(_with_prefix(_state(straight, EMA_STEPS), "extra."),
                      _with_prefix(_state(resumed, EMA_STEPS), "extra."))
    assert _losses(resumed) == _losses(straight)[2:]  # its own log starts at step 3


def test_resuming_with_the_other_target_setting_is_refused(ema_runs):
    data, output = ema_runs
    common = ("train", "--plugin", "lcm", "--data_dir", data, "--output_dir", output, "--run_name", "mixed", *TINY)
    result = invoke(*common, "--resume_from_checkpoint", output / "ema" / "lora" / "checkpoint-2")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "trained with --use_target_model" in result.output
    result = invoke(*common, "--use_target_model", "--resume_from_checkpoint",
                    output / "online" / "lora" / "checkpoint-2")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "no EMA target" in result.output


def test_ema_decay_outside_0_1_is_refused_in_one_line(tmp_path):
    for decay in ("1.5", "1", "-0.1"):
        result = invoke("train", "--plugin", "lcm", "--data_dir", tmp_path, "--use_target_model", "--ema_decay", decay)
        assert result.exit_code == 2
        assert result.output.count("\n") == 1
        assert f"--ema_decay {float(decay):g} is outside [0, 1)" in result.output
