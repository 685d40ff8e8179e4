"""scripts/pretrain_sweep.py: pretrain configurations side by side, each sized to a wall-clock budget."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.lab.dataset import write_dataset
from harness.models import embedded
from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain_sweep.py"
# Tiny runs on the shipped VAE (no VAE stage): the sweep's calibration, sizing and logs, not the quality.
SHARED = ("--vae_decoder_steps", "0", "--batch_size", "4", "--unet_channels", "32", "32", "--text_width", "16",
          "--eval_prompts", "2", "--eval_steps", "2", "--reliance_examples", "2", "--lr_warmup_steps", "1",
          "--seed", "3")


def _sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def sweep():
    return load_script("pretrain_sweep")


@pytest.mark.parametrize("flags, message", [
    (("--", "--output_dir", "out", "--max_steps", "9"), "--max_steps is set by the sweep for each run"),
    (("--", "--output_dir", "out", "--run-name", "x"), "--run_name is set by the sweep for each run"),
    (("--", "--data_dir", "d"), "pass --output_dir (after --) for the runs"),
    (("--calibration_steps", "5", "5", "--", "--output_dir", "out"), "needs 0 < FROM < TO"),
    (("--config", "a=--text_width 8", "--", "--output_dir", "out"), "--config a is given twice"),
    (("--config", "b=--max_steps 9", "--", "--output_dir", "out"), "--config b: --max_steps is set by the sweep"),
    (("--config", "b=--output_dir x", "--", "--output_dir", "out"), "--config b: --output_dir is set by the sweep"),
])
def test_a_bad_sweep_is_refused_in_one_line_before_anything_runs(flags, message):
    result = _sweep("--budget", "10", "--config", "a=", *flags, timeout=60)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not (REPO / "out").exists()


def test_a_config_name_must_be_a_folder_name_and_the_budget_positive():
    result = _sweep("--budget", "10", "--config", "../up=--text_width 8", "--", "--output_dir", "out", timeout=60)
    assert result.returncode == 2 and "start with a folder name" in result.stderr
    for budget in ("0", "nan", "inf"):
        result = _sweep("--budget", budget, "--config", "a=", "--", "--output_dir", "out", timeout=60)
        assert result.returncode == 2
        assert f"--budget {budget} must be a finite number of seconds above 0" in result.stderr
    result = _sweep("--budget", "9", "--eval_seconds", "nan", "--config", "a=", "--", "--output_dir", "out",
                    timeout=60)
    assert result.returncode == 2
    assert "--eval_seconds nan must be a finite number of seconds, 0 or more" in result.stderr


def test_the_output_folder_may_be_given_with_an_equals_sign_and_a_tilde(sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    args, common = sweep.parse(["--budget", "9", "--config", "a=--text_width 8", "--", "--output-dir=~/runs"])
    assert args.root == tmp_path / "runs" and args.configs == {"a": ["--text_width", "8"]}
    assert common == ["--output-dir=~/runs"]


def test_a_folder_that_holds_a_run_is_refused_unless_the_run_is_resumed_or_replaced(sweep, tmp_path, capsys):
    (tmp_path / "a" / "model").mkdir(parents=True)
    with pytest.raises(SystemExit):
        sweep.parse(["--budget", "9", "--config", "a=", "--", "--output_dir", str(tmp_path)])
    assert f"{tmp_path / 'a'} already holds a run" in capsys.readouterr().err
    for restart in (["--overwrite"], ["--resume_from_checkpoint", "latest"]):
        sweep.parse(["--budget", "9", "--config", "a=", "--", "--output_dir", str(tmp_path), *restart])


def test_a_run_that_fails_is_one_line_and_exit_1_with_nothing_left_running(tmp_path):
    data = write_dataset(tmp_path / "data", n=4, seed=0)
    out = tmp_path / "runs"
    result = _sweep("--budget", "60", "--config", "broken=--unet_channels 4", "--", "--data_dir", str(data),
                    "--output_dir", str(out), "--vae_path", str(embedded.embedded_model() / "vae"), *SHARED)
    assert result.returncode == 1
    assert f"broken: failed in calibration (exit 2); see {out / 'calibrate-broken.log'}" in result.stdout
    assert not (out / "calibrate-broken").exists() and (out / "calibrate-broken.log").read_text().strip()


@pytest.mark.slow
def test_each_config_trains_for_the_steps_that_fit_and_ends_before_the_budget(tmp_path):
    data = write_dataset(tmp_path / "data", n=16, seed=0)
    out = tmp_path / "runs"
    budget = 75
    began = time.time()
    result = _sweep("--budget", str(budget), "--calibration_steps", "2", "6", "--eval_seconds", "3",
                    "--config", "narrow=", "--config", "wide_text=--text_width 32 --text_layers 2",
                    "--", "--data_dir", str(data), "--output_dir", str(out),
                    "--vae_path", str(embedded.embedded_model() / "vae"), *SHARED)
    elapsed = time.time() - began
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < budget + 30, elapsed  # the runs end by the deadline, or are stopped there
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["narrow", "wide_text"]  # calibration removed
    for name, width in (("narrow", 16), ("wide_text", 32)):
        line = next(line for line in result.stdout.splitlines()
                    if line.startswith(f"{name}: ") and " steps at " in line)
        steps = int(line.split()[1])
        config = json.loads((out / name / "config.json").read_text())["config"]
        assert config["max_steps"] == steps >= 5 and config["eval_every"] == steps // 5
        assert config["text_width"] == width and config["batch_size"] == 4
        evaluations = [json.loads(row) for row in (out / name / "fidelity.jsonl").read_text().splitlines()]
        assert [row["step"] for row in evaluations] == [steps // 5 * k for k in range(1, 6)]
        assert "reliance" in evaluations[-1]
        assert (out / name / "model" / "final" / "unet" / "config.json").is_file()
        assert f"{name}: exit 0; judge at step {steps}: {evaluations[-1]['overall']}" in result.stdout
