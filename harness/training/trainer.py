"""The training loop every trainer plugin shares.

A trainer plugin subclasses :class:`Trainer` (for a LoRA student, through ``harness.training.LoraTrainer``),
sets ``name``, ``description`` and ``config_class`` (a dataclass extending ``TrainConfig``), and implements
the three abstract methods:

- ``setup()``: load the models and return the module whose ``requires_grad`` parameters train;
- ``compute_loss(batch, generator)``: the loss of one micro-batch, drawing all randomness from ``generator``;
- ``save_weights(folder)``: the inference artifact written into every checkpoint and into ``final/``.

The registry refuses a class that lacks one of them. Optional hooks, each with a default that does nothing:

- ``prepare_data(dataset)``, ``validation_rows(prompts, seed)`` and ``resolved_settings()``;
- state of its own that changes as it trains (e.g. lcm's EMA target weights): ``after_optimizer_step()``
  runs after every optimizer step, ``extra_state()`` returns the tensors a checkpoint stores for it and
  ``load_extra_state(tensors)`` takes them back when a run resumes, so a resumed run ends as the
  uninterrupted one does;
- ``on_step_end(report)``: runs on the main process after each optimizer step has been logged, before that
  step's checkpoint and validation, e.g. for an evaluation of the trainer's own (pretrain's fidelity judge),
  which it can send to the trackers with ``log_metrics``.

Trainers override these public methods only; the underscore methods are the loop's own.

The base class runs the loop (``harness.training.loop``) once for all trainers.
"""

from __future__ import annotations

import abc
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from PIL import Image

from harness.errors import HarnessError
from harness.training.config import TrainConfig
from harness.training.loop import TrainingLoop
from harness.training.state import StepReport
from harness.training.trackers import resolve_report_to

if TYPE_CHECKING:
    from accelerate import Accelerator

class Trainer(TrainingLoop, abc.ABC):
    """Base class of trainer plugins; see the module docstring for what a subclass supplies."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    #: Subfolder of the run that holds checkpoint-N and final/.
    weights_folder: ClassVar[str] = "checkpoints"

    def __init__(self, config: TrainConfig, plugin_manager=None,
                 on_step: Callable[[StepReport], None] | None = None,
                 notify: Callable[[str], None] | None = None):
        """``on_step`` watches every step's report from outside (the CLI's progress bar; subclasses override
        ``on_step_end`` instead); ``notify`` shows the user a message (default: print to stderr)."""
        config.check()
        self.config = config
        self.plugin_manager = plugin_manager
        self.on_step = on_step or (lambda report: None)
        self._notify = notify or (lambda message: print(message, file=sys.stderr))
        self._accelerator: Accelerator | None = None  # train() starts it
        self.resolution = config.resolution  # setup() fills it in when the model decides it
        self.tracker_names = resolve_report_to(config.report_to)

    # ----- what a trainer supplies -----

    @abc.abstractmethod
    def setup(self) -> torch.nn.Module:
        """Load models onto ``self.device`` in ``self.weight_dtype``; return the module to train."""

    def prepare_data(self, dataset: torch.utils.data.Dataset[Any]) -> torch.utils.data.Dataset[Any]:
        """Change the training data once before the loop (e.g. pre-encode it). Default: as it is."""
        return dataset

    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one micro-batch; call ``self.model`` for every forward that needs gradients.

        ``batch["caption"]`` is a list of strings; ``batch["pixel_values"]`` is (B, 3, R, R) in [-1, 1] on
        ``self.device``, unless ``prepare_data`` replaced the dataset with one of other items.
        """

    @abc.abstractmethod
    def save_weights(self, folder: Path) -> None:
        """Write what inference loads (e.g. ``pytorch_lora_weights.safetensors``) into ``folder``."""

    def validation_rows(self, prompts: Sequence[str], seed: int) -> list[tuple[str, list[Image.Image]]]:
        """Labelled rows of images (one per prompt) for a validation grid. Default: none."""
        return []

    def resolved_settings(self) -> dict[str, Any]:
        """Settings the trainer decided at setup, recorded in config.json."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called in every process after each optimizer step (once per --gradient_accumulation_steps
        micro-batches, after the update), e.g. to update an EMA of the trained weights. Default: nothing."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors of the trainer's own that a checkpoint must keep to resume exactly (called on the main
        process only; stored as ``extra.NAME`` in training_state.safetensors). Default: none."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``extra_state()`` saved (CPU tensors, ``extra.`` removed), after the trained weights
        are restored. Default: refuse a checkpoint that holds such state, as this trainer would drop it."""
        if tensors:
            raise HarnessError(f"the checkpoint holds trainer state this run does not use (e.g. "
                               f"'{sorted(tensors)[0]}'); resume with the settings it was trained with.")

    def on_step_end(self, report: StepReport) -> None:
        """Called on the main process only, after each optimizer step is written to train_log.jsonl and the
        trackers, before that step's checkpoint and validation grid. Default: nothing."""

    def benchmark_command(self, final: Path) -> str:
        """The ``harness bench`` command line that samples what ``final/`` holds (shown after training)."""
        return f"harness bench --sampler local-student --lora_path {final}"
