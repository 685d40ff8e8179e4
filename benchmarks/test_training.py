"""Distill training speed on the embedded model, through `harness train` itself.

Each round is a whole short run (load, data, 6 optimizer steps, final save); ``extra_info`` holds the
seconds per optimizer step that the trainer's own log measured for steps 2-6 (step 1 pays warm-up).
"""

import json
import shutil

from click.testing import CliRunner
from PIL import Image, ImageDraw

from harness.cli import cli

STEPS = 6


def shapes_folder(folder, count=8):
    folder.mkdir(parents=True)
    for index in range(count):
        image = Image.new("RGB", (64, 64), "blue")
        ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="red")
        image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text("a large red circle at the centre on a blue background")
    return folder


def test_distill_training_steps(benchmark, tmp_path):
    data = shapes_folder(tmp_path / "data")
    output = tmp_path / "out"
    per_step = []

    def train():
        shutil.rmtree(output, ignore_errors=True)
        result = CliRunner().invoke(
            cli,
            [
                "train",
                "--plugin",
                "distill",
                "--model",
                "embedded",
                "--data_dir",
                str(data),
                "--max_steps",
                str(STEPS),
                "--batch_size",
                "1",
                "--grad_accum",
                "1",
                "--teacher_steps",
                "50",
                "--output_dir",
                str(output),
                "--seed",
                "0",
            ],
        )
        assert result.exit_code == 0, result.output
        log = [json.loads(line) for line in (output / "lora_student" / "train_log.jsonl").read_text().splitlines()]
        per_step.append((log[-1]["seconds"] - log[0]["seconds"]) / (len(log) - 1))

    benchmark.pedantic(train, rounds=3, iterations=1)
    per_step.sort()
    benchmark.extra_info.update(
        seconds_per_step_median=per_step[1],
        steps_per_s=1 / per_step[1],
        objective="trajectory",
        teacher_steps=50,
        batch_size=1,
        resolution=64,
    )
