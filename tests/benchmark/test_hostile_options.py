"""Hostile option values: each is refused in one line (exit code 2) before anything is loaded or written.

NaN and inf for every float option of every command and trainer (found from the declared options, so one added
later is covered too), run names that are not one folder, a --lora_path that is neither file nor folder, training
weights that an update left non-finite, a thin strip of an image in the training data, and data shapes' size and
--out checks.
"""

import math
import os
from pathlib import Path

import click
import pytest
import torch
from PIL import Image

from harness.cli.app import cli
from harness.cli.train import make_trainer_command
from harness.errors import HarnessError
from harness.hooks.registry import get_registry
from harness.models import loading as models
from harness.training.data import Examples, ImageCaptionDataset, find_examples
from harness.training.trainer import Trainer
from tests.conftest import invoke
from tests.training.test_train_data import write_shapes

FAST = ("--model", "embedded", "--teacher_steps", "2", "--student_steps", "2", "--grad_accum", "1", "--seed", "3",
        "--max_steps", "1")


def _float_options() -> list[tuple[tuple[str, ...], str]]:
    """(command line up to the option, the option's flag) for every float option harness declares."""
    found = []

    def walk(command: click.Command, prefix: tuple[str, ...], ctx: click.Context) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None
                walk(sub, (*prefix, name), click.Context(sub, parent=ctx, info_name=name))
            return
        # Arguments stand before the option so that a missing one is not what click reports; --dry-run keeps a
        # value that got through from starting a run (an inf --min_time would never end).
        arguments = tuple("x" for param in command.params if isinstance(param, click.Argument) and param.required)
        dry_run = tuple(opt for param in command.params for opt in param.opts if opt == "--dry-run")
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.types.FloatParamType):
                found.append(((*prefix, *arguments, *dry_run), param.opts[0]))

    root = click.Context(cli, info_name="harness")
    walk(cli, (), root)
    registry = get_registry(())
    for name in sorted(registry.trainers):
        walk(make_trainer_command(registry.trainer(name), registry.pm), ("train", "--plugin", name), root)
    return found


FLOAT_OPTIONS = _float_options()


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("line, flag", FLOAT_OPTIONS, ids=[" ".join((*line[:3], flag)) for line, flag in FLOAT_OPTIONS])
def test_every_float_option_refuses_nan_and_inf_in_one_line(tmp_path, monkeypatch, line, flag, value):
    monkeypatch.chdir(tmp_path)
    result = invoke(*line, flag, value)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (error,) = _errors(result.output)
    assert f"{value} is not a finite number; pass " in error
    assert list(tmp_path.iterdir()) == []


def test_float_options_of_every_kind_of_command_are_covered_and_name_the_default():
    flags = {(line[0], flag) for line, flag in FLOAT_OPTIONS}
    for expected in [("bench", "--baseline-guidance"), ("bench", "--min-time"), ("bench", "--tcd-gamma"),
                     ("eval", "--baseline-guidance"), ("compare", "--fail-above"), ("train", "--learning-rate")]:
        assert expected in flags
    assert {line[2] for line, flag in FLOAT_OPTIONS if line[0] == "train"} == set(get_registry(()).trainers)
    result = invoke("train", "--plugin", "distill", "--learning_rate", "nan")
    assert _errors(result.output) == ["Error: Invalid value for '--learning-rate' / '--learning_rate': nan is not a "
                                      "finite number; pass e.g. 0.0001 (the default)."]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("data"), count=4)


def _train(shapes: Path, output: Path, *extra):
    return invoke("train", "--plugin", "distill", "--data_dir", shapes, "--output_dir", output, *FAST, *extra)


@pytest.mark.parametrize("name", ["", ".", "..", "r1/lora/final", "/tmp/elsewhere", "run/"])
def test_run_name_must_be_one_plain_folder_name(shapes, tmp_path, name):
    output = tmp_path / "checkpoints"
    result = _train(shapes, output, "--run_name", name)
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: --run_name {name!r} is not a plain folder name; pass one name without "
                                      "'/', e.g. --run_name my_lora."]
    assert not output.exists()


def test_a_run_folder_name_too_long_for_the_system_is_one_line_and_leaves_nothing(shapes, tmp_path):
    output = tmp_path / "checkpoints"
    name = "x" * 300  # one part of a path holds at most 255 bytes
    result = _train(shapes, output, "--run_name", name)
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: cannot write to output folder '{output / name}': File name too long; "
                                      "pass a writable --output_dir/--run_name."]
    assert not output.exists()
    outdir = tmp_path / "new" / ("y" * 300)
    result = invoke("bench", "--steps", "1", "--num_images", "1", "--warmup", "0", "--repeats", "1", "--quiet",
                    "--outdir", outdir)
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: cannot write to output folder '{outdir}': File name too long; pass a "
                                      "writable --outdir."]
    assert not (tmp_path / "new").exists()

def _fifo(folder: Path) -> Path:
    path = folder / "fifo.safetensors"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("make", [lambda folder: Path(os.devnull), _fifo], ids=["devnull", "fifo"])
def test_lora_path_that_is_neither_file_nor_folder(shapes, tmp_path, make):
    path = make(tmp_path)
    message = f"--lora_path '{path}' is not a file or folder; pass the LoRA folder or its .safetensors file."
    with pytest.raises(HarnessError, match="is not a file or folder") as raised:
        models.resolve_lora(str(path), None)
    assert raised.value.message == message
    output = tmp_path / "checkpoints"
    result = _train(shapes, output, "--run_name", "run", "--lora_path", path)
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: {message}"]
    assert not output.exists()


def test_weights_an_update_left_non_finite_are_not_saved(shapes, tmp_path, monkeypatch):
    """The loss is computed before the update, so it stays finite while the weights it produced are inf."""
    update = Trainer._optimizer_step

    def poisoned(self, batches, run):
        loss = update(self, batches, run)
        with torch.no_grad():
            next(iter(run.trainable.values())).fill_(math.inf)
        return loss

    monkeypatch.setattr(Trainer, "_optimizer_step", poisoned)
    output = tmp_path / "checkpoints"
    result = _train(shapes, output, "--run_name", "run")
    assert result.exit_code == 2
    (error,) = _errors(result.output)
    assert error.startswith("Error: the weights became NaN or inf at step 1 (1 of ")
    assert "lower --learning_rate or --max_grad_norm" in error
    assert not (output / "run" / "lora" / "final").exists()


def test_a_learning_rate_beyond_float32_is_one_line(shapes, tmp_path):
    output = tmp_path / "checkpoints"
    result = _train(shapes, output, "--run_name", "run", "--learning_rate", "1e39")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert _errors(result.output) == ["Error: the optimizer step overflowed float32 at step 1: the learning rate is "
                                      "far too large; lower --learning_rate. No checkpoint was written yet."]
    assert not (output / "run" / "lora").exists()


def test_a_thin_strip_of_an_image_is_skipped_and_named(tmp_path):
    data = write_shapes(tmp_path / "data", count=2)
    strip = data / "strip.png"
    Image.new("RGB", (1, 400_000), "red").save(strip)  # 1.6 KB, far under the bomb guard's pixel limit
    (data / "strip.txt").write_text("a red line\n")
    examples = find_examples(None, str(data))
    assert len(examples) == 2
    assert examples.skipped == [f"1 image(s) more than 64 times longer on one side than the other, which the centre "
                                f"crop would reduce to a sliver, e.g. '{strip}' (1x400000 pixels)"]


def test_a_thin_image_from_a_dataset_is_one_line_not_gigabytes():
    """A hub dataset's images are not checked beforehand; resizing this one's short side to 64 would take 7 GB."""
    examples = Examples("dataset 'thin'", ["a red line"], lambda index: Image.new("RGB", (1, 400_000), "red"))
    with pytest.raises(HarnessError) as raised:
        ImageCaptionDataset(examples, 64)[0]
    assert raised.value.message == ("cannot read image 0 of dataset 'thin': DecompressionBombError: a 1x400000 image "
                                    "resized to 64x25600000 pixels exceeds Pillow's limit of 89478485; remove or "
                                    "replace the file.")


def test_data_shapes_refuses_a_huge_resolution(tmp_path):
    out = tmp_path / "data"
    result = invoke("data", "shapes", "--n", "1", "--out", out, "--resolution", "99999992")
    assert result.exit_code == 2
    assert _errors(result.output) == ["Error: --resolution 99999992 is larger than 2048, the largest harness draws; "
                                      "pick e.g. 64."]
    assert list(tmp_path.iterdir()) == []


def test_data_shapes_out_under_a_file_names_the_file(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("important\n")
    result = invoke("data", "shapes", "--n", "1", "--out", afile / "x" / "y")
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: --out '{afile / 'x' / 'y'}' lies under '{afile}', which is a file, not "
                                      "a folder; pass an --out outside it."]
    assert afile.read_text() == "important\n"
    assert sorted(tmp_path.iterdir()) == [afile]
