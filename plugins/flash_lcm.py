"""flash-lcm: Jasper's Flash Diffusion LoRA on Stable Diffusion 1.5, as the seed's demo.py runs it."""

import harness
from harness import models
from harness.sampler import FewStepLoraSampler


class FlashLcmSampler(FewStepLoraSampler):
    name = "flash-lcm"
    file_label = "flash"  # the seed's compare_baseline30_flash4_seed42.png
    description = (
        "Base model + fused Flash LoRA (--lora_id, default: the model's own, jasperai/flash-sd on SD 1.5; "
        "--lora_path wins unless --lora_id is given too), LCMScheduler with trailing timesteps, guidance 0."
    )

    def lora_source(self) -> models.LoraSource | None:
        # --lora_path replaces the Flash LoRA, as in the seed's demo.py. Given both, --lora_id is flash-lcm's
        # and --lora_path local-student's, so one run can compare two LoRAs.
        if self.config.lora_id and self.config.lora_path:
            return models.resolve_lora(None, self.config.lora_id)
        return super().lora_source()


@harness.hookimpl
def register_samplers(register):
    register(FlashLcmSampler)
