"""`harness train --report_to`: accelerate's trackers get the loss, learning rate, seconds per step, validation
grids and the config, inside the run folder; a missing or failing tracker ends in one line and leaves the run
as it was."""

import hashlib
import json
import shutil

import pytest
from accelerate.tracking import TensorBoardTracker, WandBTracker
from harness_plugins.distill import DistillTrainer
from PIL import Image

from harness.errors import HarnessError
from harness.lab.dataset import write_dataset
from harness.training import trackers
from tests.conftest import invoke
from tests.plugins.test_train_pretrain import TINY
from tests.training.test_train_data import write_shapes

STEPS = 3
# Three steps, a checkpoint at step 2, one validation grid (at the last step), a schedule whose lr moves.
FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--max_steps", STEPS, "--checkpointing_steps", "2", "--lr_scheduler", "linear")
VALIDATION = ("--validation_prompts", "a red circle on a blue background", "--validation_every", STEPS)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shapes, embedded_model):
    pytest.importorskip("tensorboard")
    output = tmp_path_factory.mktemp("runs")
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", output, "--run_name", "tb",
                    "--report_to", "tensorboard", *FAST, *VALIDATION)
    assert result.exit_code == 0, result.output
    return output / "tb"


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _tree(folder):
    """Every file under ``folder`` with a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_tensorboard_gets_loss_lr_and_seconds_per_step_for_every_step(run):
    events, log = _events(run / "trackers" / "tensorboard"), _log(run)
    loss = events.Scalars("train/loss")
    assert [point.step for point in loss] == list(range(1, STEPS + 1))
    assert [point.value for point in loss] == pytest.approx([line["loss"] for line in log], rel=1e-6)
    lr = events.Scalars("train/learning_rate")
    assert [point.value for point in lr] == pytest.approx([line["lr"] for line in log], rel=1e-6)
    assert lr[0].value > lr[-1].value  # the linear schedule, not a constant
    # Each step's seconds are how far train_log.jsonl's running total moved (rounded there to milliseconds).
    per_step = [point.value for point in events.Scalars("train/seconds_per_step")]
    totals = [0.0] + [line["seconds"] for line in log]
    assert all(value > 0 for value in per_step)
    assert per_step == pytest.approx([b - a for a, b in zip(totals, totals[1:])], abs=2e-3)


def test_tensorboard_gets_the_validation_grid(run):
    [image] = _events(run / "trackers" / "tensorboard").Images("validation")
    grid = Image.open(run / "validation" / f"step-{STEPS:06d}.png")
    assert image.step == STEPS and (image.width, image.height) == grid.size


def test_tensorboard_gets_the_config_as_text_and_hparams(run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    folder = run / "trackers" / "tensorboard"
    [text] = _events(folder).Tensors("config/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode()) == json.loads((run / "config.json").read_text())
    [hparams_run] = [path for path in folder.iterdir() if path.is_dir() and any(path.glob("events.*"))]
    content = _events(hparams_run).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["config.max_steps"].number_value == STEPS
    assert hparams["config.report_to"].string_value == "tensorboard"
    assert hparams["resolved.seed"].number_value == 3
    assert json.loads(hparams["config.validation_prompts"].string_value) == [VALIDATION[1]]


def test_every_tracker_file_is_inside_the_run_folder(run):
    assert [path.name for path in run.parent.iterdir()] == ["tb"]
    assert sorted(path.name for path in run.iterdir()) == [
        "config.json", "lora", "trackers", "train_log.jsonl", "validation"]
    assert [path.name for path in (run / "trackers").iterdir()] == ["tensorboard"]


def test_report_to_none_is_the_default_and_writes_no_tracker_folder(tmp_path, shapes, embedded_model):
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lora_student" / "config.json").read_text())["config"]["report_to"] == "none"
    assert not (tmp_path / "lora_student" / "trackers").exists()


def test_overwrite_deletes_the_earlier_runs_tracker_files(run, tmp_path, shapes):
    shutil.copytree(run, tmp_path / "tb")
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path, "--run_name", "tb",
                    "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "tb" / "trackers").exists()


@pytest.mark.parametrize("tracker, install", [
    ("tensorboard", 'pip install "fewstep-harness[train]" (or pip install tensorboard)'),
    ("wandb", "pip install wandb"),
    ("mlflow", "pip install mlflow"),
])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(tmp_path, shapes, monkeypatch, tracker,
                                                                          install):
    monkeypatch.setattr(trackers, "tracker_available", lambda name: False)
    monkeypatch.setattr(DistillTrainer, "setup", lambda self: pytest.fail("the model was loaded"))
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path / "out",
                    "--report_to", tracker, *FAST)
    assert result.exit_code == 2
    assert result.output == f"Error: --report_to {tracker} needs the {tracker} package; install it with {install}.\n"
    assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_is_refused_before_anything_is_written(tmp_path, shapes):
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path / "out",
                    "--report_to", "comet_ml", *FAST)
    assert result.exit_code == 2
    [error] = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert error == ("Error: Invalid value for '--report-to' / '--report_to': 'comet_ml' is not one of 'none', "
                     "'tensorboard', 'wandb', 'mlflow', 'all'.")
    assert not (tmp_path / "out").exists()


def test_all_is_each_installed_tracker(monkeypatch):
    monkeypatch.setattr(trackers, "tracker_available", lambda name: name != "wandb")
    assert trackers.resolve_report_to("all") == ["tensorboard", "mlflow"]
    monkeypatch.setattr(trackers, "tracker_available", lambda name: False)
    assert trackers.resolve_report_to("all") == []
    assert trackers.resolve_report_to("none") == []
    with pytest.raises(HarnessError, match="--report_to comet_ml is not a tracker harness knows"):
        trackers.resolve_report_to("comet_ml")  # a Python caller, past click's choices


def _wandb_without_login(monkeypatch):
    """wandb installed but not logged in: its start raises what wandb.init raises without an API key."""
    def start(self):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setattr(trackers, "tracker_available", lambda name: True)
    monkeypatch.setattr(WandBTracker, "start", start)


WANDB_ERROR = ("Error: --report_to wandb could not start: RuntimeError: api_key not configured (no-tty). call "
               "wandb.login(key=[your_api_key]); log in with wandb login, or set WANDB_MODE=offline to keep the run "
               "in RUN/trackers/wandb, or train without it (--report_to none).")


def test_a_tracker_that_cannot_start_ends_in_one_line_and_writes_no_run(tmp_path, shapes, embedded_model,
                                                                       monkeypatch):
    _wandb_without_login(monkeypatch)
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path / "out",
                    "--report_to", "wandb", *FAST)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == WANDB_ERROR and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_tracker_failing_as_a_run_resumes_leaves_the_run_as_it_was(run, tmp_path, shapes, monkeypatch):
    copy = tmp_path / "tb"
    shutil.copytree(run, copy)
    before = _tree(copy)
    started, real_start = [], TensorBoardTracker.start

    def start_tensorboard(self):
        real_start(self)
        started.append(self.writer.get_logdir())

    monkeypatch.setattr(TensorBoardTracker, "start", start_tensorboard)
    _wandb_without_login(monkeypatch)
    # all: tensorboard starts (and opens a new event file), then wandb fails; no mlflow, whose set-up comes first.
    monkeypatch.setattr(trackers, "tracker_available", lambda name: name != "mlflow")
    result = invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", tmp_path, "--run_name", "tb",
                    "--report_to", "all", "--resume_from_checkpoint", "latest", *FAST, "--max_steps", STEPS + 1)
    assert result.exit_code == 2
    assert "resuming from" in result.output and "at step 2" in result.output
    assert result.output.splitlines()[-1] == WANDB_ERROR and "Traceback" not in result.output
    assert started == [str(copy / "trackers" / "tensorboard")]
    assert _tree(copy) == before  # config.json, train_log.jsonl, checkpoints and tracker files as they were


def test_pretrain_logs_each_stage_into_its_own_folder_and_the_held_out_fidelity(tmp_path):
    pytest.importorskip("tensorboard")
    data = write_dataset(tmp_path / "data", n=16, seed=0)
    result = invoke("train", "--plugin", "pretrain", "--data_dir", data, "--output_dir", tmp_path / "out",
                    "--max_steps", 2, *TINY, "--vae_steps", 1, "--vae_decoder_steps", 0, "--report_to", "tensorboard")
    assert result.exit_code == 0, result.output
    run = tmp_path / "out" / "embedded"
    vae = _events(run / "vae" / "trackers" / "tensorboard")
    assert [point.step for point in vae.Scalars("train/loss")] == [1]
    unet = _events(run / "trackers" / "tensorboard")
    assert [point.value for point in unet.Scalars("train/loss")] == pytest.approx([line["loss"] for line in _log(run)])
    fidelity = [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines()]
    overall = unet.Scalars("fidelity/overall")
    assert [(point.step, round(point.value, 4)) for point in overall] == [(2, fidelity[0]["overall"])]
