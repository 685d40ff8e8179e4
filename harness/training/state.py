"""Where a training run stands: what each step reports, and what a checkpoint saves and a resumed run restores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepReport:
    """What one finished optimizer step reports (to ``train_log.jsonl`` and the progress bar)."""

    step: int
    max_steps: int
    loss: float
    lr: float
    seconds: float  # training time since the run began, across resumes
    step_seconds: float  # of this step: from the previous report (or the loop's start) to this one

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, "lr": self.lr, "seconds": round(self.seconds, 3)}


@dataclass
class Progress:
    """Where a run stands; a checkpoint stores it and a resumed run starts from it."""

    step: int = 0
    samples_seen: int = 0
    seconds: float = 0.0


@dataclass
class RunState:
    """What a checkpoint saves and a resumed run restores, besides the weights the trainer saves."""

    trainable: dict[str, torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    generator: torch.Generator  # every random draw of compute_loss
    progress: Progress
