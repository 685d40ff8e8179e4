"""A LoRA on the UNet as the trained student, saved as a diffusers LoRA that ``local-student`` samples.

Shared by the few-step trainers (distillation now, consistency distillation next): the student is the
base UNet plus a LoRA, sampled like ``local-student`` (LCMScheduler, trailing timesteps, guidance 0); the
base model is the same UNet with the LoRA switched off, so a teacher costs no second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from harness.errors import HarnessError
from harness.models import loading as models
from harness.models import lora_io
from harness.training.config import TrainConfig, setting
from harness.training.diffusion import CLEAN, LatentDiffusionTrainer

if TYPE_CHECKING:
    # The defining modules, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_lcm import LCMScheduler

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoraTrainConfig(TrainConfig):
    """Settings of a UNet LoRA student."""

    lora_rank: int = setting(4, "LoRA rank.", minimum=1)
    lora_alpha: int = setting(32, "LoRA alpha; the LoRA acts at scale alpha / rank.", minimum=1)
    lora_target_modules: tuple[str, ...] = setting(
        DEFAULT_TARGET_MODULES, "UNet modules that get a LoRA (several after one flag; default: attention projections)."
    )
    lora_path: str | None = setting(
        None,
        "Start the student from this LoRA (folder or .safetensors, diffusers or PEFT format); "
        "its rank, alpha and target modules replace --lora_rank, --lora_alpha, --lora_target_modules.",
    )


class LoraTrainer(LatentDiffusionTrainer):
    """Trains a LoRA on the UNet; checkpoints and final/ hold ``pytorch_lora_weights.safetensors``."""

    config_class = LoraTrainConfig
    weights_folder = "lora"
    config: LoraTrainConfig

    def setup(self) -> torch.nn.Module:
        pipe = self.load_pipeline()
        unet = pipe.unet
        if self.config.lora_path:
            source = models.resolve_lora(self.config.lora_path, None)
            assert source is not None  # a --lora_path resolves to a source or raises
            models.load_lora(pipe, source, fuse=False)
            adapters = list(getattr(unet, "peft_config", {}))
            if len(adapters) != 1:
                raise HarnessError(
                    f"--lora_path '{self.config.lora_path}' holds no UNet LoRA to start the student "
                    "from; pass a LoRA trained for this model's UNet (e.g. .../lora/final)."
                )
            self.adapter_name = adapters[0]
            for name, parameter in unet.named_parameters():
                parameter.requires_grad_("lora_" in name)
        else:
            from peft import LoraConfig

            self.adapter_name = "default"
            # Gaussian A and zero B: the student starts exactly at the base model.
            config = LoraConfig(
                r=self.config.lora_rank,
                lora_alpha=self.config.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(self.config.lora_target_modules),
            )
            try:
                unet.add_adapter(config, adapter_name=self.adapter_name)
            except ValueError as error:
                raise HarnessError(
                    f"--lora_target_modules {' '.join(self.config.lora_target_modules)}: {error}"
                ) from None
        unet.train()
        # The empty prompt's states: the unconditional half of every guided teacher call.
        self.unconditional = self.encode_prompts([""])
        return unet

    def save_weights(self, folder: Path) -> None:
        unet = cast("UNet2DConditionModel", self.unwrapped_model)  # setup() returned the UNet
        lora_io.save_diffusers_lora(unet, folder, self.adapter_name)

    def resolved_settings(self) -> dict[str, Any]:
        lora = lora_io.adapter_metadata(self.pipe.unet.peft_config[self.adapter_name].to_dict())
        return {**super().resolved_settings(), "lora": lora}

    @contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The UNet with its LoRA switched off (the frozen base model), for passes without gradients."""
        unet = cast("UNet2DConditionModel", self.unwrapped_model)  # setup() returned the UNet
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    def student_scheduler(self) -> LCMScheduler:
        """The scheduler local-student samples the LoRA with: LCMScheduler, trailing timesteps."""
        return models.few_step_scheduler(self.scheduler_config)

    def student_timesteps(self, steps: int) -> list[int]:
        """The timesteps a ``steps``-step student visits, then CLEAN."""
        scheduler = self.student_scheduler()
        try:
            scheduler.set_timesteps(steps)
        except ValueError as error:
            raise HarnessError(f"a {steps}-step student schedule: {error}") from None
        return [int(t) for t in scheduler.timesteps] + [CLEAN]

    def teacher_outputs(
        self, teacher: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's unconditional and conditional outputs at (x, t), from ONE batched UNet call.

        ``t`` is one timestep per sample; trainers that guide call this under ``torch.no_grad``.
        """
        states = torch.cat([self.unconditional.expand(x.shape[0], -1, -1), conditions])
        output = teacher(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=states).sample.float()
        return output.chunk(2)


def distance(prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: float) -> torch.Tensor:
    """The training loss: pseudo-Huber sqrt(d^2 + c^2) - c (consistency models) for "huber", else MSE."""
    if loss == "huber":
        return (torch.sqrt((prediction - target) ** 2 + huber_c**2) - huber_c).mean()
    return torch.nn.functional.mse_loss(prediction, target)
