"""What trainer plugins build on: typed configs, the shared training loop, latent-diffusion and LoRA layers.

A trainer plugin registers its class with ``register_trainers(register)``; ``harness train --plugin NAME``
turns the fields of its ``config_class`` into options and calls ``train()``.
"""

from harness.training.config import TrainConfig, setting
from harness.training.diffusion import CLEAN, LatentDiffusionTrainer, NoiseSchedule
from harness.training.lora import LoraTrainConfig, LoraTrainer
from harness.training.state import StepReport
from harness.training.trainer import Trainer

__all__ = [
    "CLEAN", "LatentDiffusionTrainer", "LoraTrainConfig", "LoraTrainer", "NoiseSchedule", "StepReport",
    "TrainConfig", "Trainer", "setting",
]
