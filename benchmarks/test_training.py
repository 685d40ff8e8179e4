"""Distill training speed on the embedded model, through `harness train` itself.

Each round is a whole short run (load, data, 6 optimizer steps, final save); ``extra_info`` holds the
seconds per optimizer step that the trainer's own log measured for steps 2-6 (step 1 pays warm-up).
"""

import json
import shutil

from click.testing import CliRunner
from PIL import Image, ImageDraw

from harness.cli.app import cli

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


FLASH_STEPS = 6


def test_flash_training_steps(benchmark, tmp_path, device):
    """Flash Diffusion with all three losses on from step 1 (one phase): the even steps add the generator's
    adversarial term, the odd ones update the discriminator, so steps 2-6 average both. ``extra_info`` also holds
    each figure of the run's memory peak (the process's peak RSS on the CPU, the CUDA allocator's peaks on a GPU),
    measured by ``harness.benchmark.timing.MemoryTracker`` as ``harness bench`` measures samplers: the largest
    over rounds."""
    from harness.benchmark.timing import MemoryTracker

    data = shapes_folder(tmp_path / "data")
    output = tmp_path / "out"
    per_step, peaks = [], []
    memory = MemoryTracker(device)

    def train():
        shutil.rmtree(output, ignore_errors=True)
        memory.reset()
        result = CliRunner().invoke(
            cli,
            [
                "train", "--plugin", "flash", "--model", "embedded", "--data_dir", str(data),
                "--max_steps", str(FLASH_STEPS), "--batch_size", "2", "--grad_accum", "1",
                "--teacher_steps", "32", "--phase_steps", "1000", "--mode_probs", "0.4", "0.2", "0.2", "0.2",
                "--distill_loss_scale", "1", "--adversarial_loss_scale", "0.3", "--dmd_loss_scale", "0.5",
                "--lora_rank", "4", "--lora_alpha", "4", "--output_dir", str(output), "--seed", "0",
            ],
        )
        assert result.exit_code == 0, result.output
        peaks.append(memory.read())
        log = [json.loads(line) for line in (output / "lora_student" / "train_log.jsonl").read_text().splitlines()]
        per_step.append((log[-1]["seconds"] - log[0]["seconds"]) / (len(log) - 1))

    benchmark.pedantic(train, rounds=3, iterations=1)
    per_step.sort()
    benchmark.extra_info.update(
        seconds_per_step_median=per_step[1],
        steps_per_s=1 / per_step[1],
        losses="distillation + adversarial 0.3 + DMD 0.5",
        teacher_steps=32,
        batch_size=2,
        resolution=64,
        **{name: max(peak[name] for peak in peaks) for name in peaks[0]},
    )
