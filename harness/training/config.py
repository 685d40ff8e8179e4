"""Typed trainer settings: the options every trainer shares, and the base class of a trainer's own.

A trainer declares its settings as a dataclass that extends :class:`TrainConfig`; each field made with
:func:`harness.options.setting` carries its help text and constraints. ``harness train`` turns every field into
one click option with both spellings (``--max_steps`` and ``--max-steps``) through
:func:`harness.options.click_options`, the mechanism ``harness bench`` and the samplers use too, so trainers
never parse flags and every command follows the same rules. Python callers build the dataclass directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

# Also imported from here by trainer configs: ``from harness.training.config import TrainConfig, setting``.
from harness.options import setting as setting  # the redundant alias marks it as re-exported

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
# diffusers.optimization.get_scheduler names that need no extra arguments.
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# The experiment trackers harness sets up (folders, images, config), as diffusers' --report_to names them.
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb", "mlflow", "all")


@dataclass
class TrainConfig:
    """Settings every trainer shares: model, data, optimisation, checkpoints, validation.

    Defaults and spellings follow the seed's ``train_student_lora.py``.
    """

    model: str | None = setting(
        None, "sd15, embedded, a hub id or a diffusers folder (default: sd15 with CUDA, else embedded).")
    dataset_name: str | None = setting(
        None, "Hugging Face dataset with images and captions, e.g. lambdalabs/naruto-blip-captions.")
    data_dir: str | None = setting(
        None, "Local folder: images/*.png + captions/*.txt, *.png beside *.txt, or images + metadata.jsonl.")
    image_column: str | None = setting(None, "Dataset column with the images (default: detected).")
    caption_column: str | None = setting(None, "Dataset column with the captions (default: detected).")
    max_train_samples: int | None = setting(None, "Use only the first N examples.", minimum=1)
    resolution: int | None = setting(
        None, "Training size in pixels; images are resized and centre-cropped to it "
              "(default: the model's native size: 512 for SD 1.5, 64 for embedded).", minimum=8)
    cache_latents: bool = setting(False, "Encode every image with the VAE once, before training.")
    output_dir: str = setting("./checkpoints", "Where runs are written: OUTPUT_DIR/RUN_NAME/lora/checkpoint-N, final.")
    run_name: str = setting("lora_student", "Folder name of this run inside --output_dir.")
    overwrite: bool = setting(False, "Delete an earlier run's checkpoints in the same folder instead of refusing.")
    max_steps: int = setting(2000, "Optimizer steps to train for.", minimum=1)
    batch_size: int = setting(1, "Images per device per micro-batch.", minimum=1)
    gradient_accumulation_steps: int = setting(
        4, "Micro-batches per optimizer step (effective batch = batch_size x this x processes).",
        aliases=("grad_accum",), minimum=1)
    learning_rate: float = setting(1e-4, "AdamW learning rate.", minimum=0)
    lr_scheduler: str = setting("constant", "Learning-rate schedule (diffusers.optimization).",
                                choices=LR_SCHEDULER_CHOICES)
    lr_warmup_steps: int = setting(0, "Steps of linear warmup at the start of the schedule.", minimum=0)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this (0: no clipping).", minimum=0)
    mixed_precision: str | None = setting(
        None, "Mixed precision (default: fp16 on CUDA, no elsewhere; always no on CPU).",
        choices=MIXED_PRECISION_CHOICES)
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass to save memory.")
    seed: int | None = setting(None, "Random seed; the same seed and data give the same weights "
                                        "(default: a random seed, written to config.json).")
    checkpointing_steps: int = setting(500, "Save a resumable checkpoint every N steps.", minimum=1)
    checkpoints_total_limit: int | None = setting(None, "Keep only the newest N checkpoints.", minimum=1)
    resume_from_checkpoint: str | None = setting(
        None, "Continue from 'latest' (the newest checkpoint of this run) or a checkpoint folder.")
    validation_prompts: tuple[str, ...] = setting(
        (), "Prompts for validation grids (several after one flag; none: no validation).")
    validation_every: int = setting(500, "Write a validation grid every N steps (and at the end).", minimum=1)
    report_to: str = setting(
        "none", "Also log loss, learning rate, seconds per step, validation grids and the config to a tracker "
                "(all: each of them that is installed); local files go to RUN/trackers.", choices=REPORT_TO_CHOICES)
    tracker_project_name: str | None = setting(
        None, "wandb project / mlflow experiment that --report_to logs the run into (default: the run name).")

    def check(self) -> None:
        """Refuse contradictory settings with one line that says what to pass instead."""
        if (self.dataset_name is None) == (self.data_dir is None):
            raise HarnessError(
                "pass exactly one of --dataset_name (a Hugging Face dataset) or --data_dir (a local folder)."
            )
        if self.resolution is not None and self.resolution % 8:
            raise HarnessError(
                f"--resolution {self.resolution} is not a multiple of 8; pick e.g. {self.resolution // 8 * 8 or 8}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_run_name(name: str) -> None:
    """--run_name is one folder inside --output_dir: '' and '.' are the output folder itself, '..' lies outside it,
    and 'r1/lora/final' would nest a run inside another run's weights. Trainers that nest a stage in their own
    run folder (pretrain's RUN/vae) build that name themselves."""
    if name in ("", ".", "..") or Path(name).name != name:
        raise HarnessError(f"--run_name {name!r} is not a plain folder name; pass one name without '/', "
                           "e.g. --run_name my_lora.")
