"""flash-lcm: Jasper's Flash Diffusion LoRA on Stable Diffusion 1.5, as the seed's demo.py runs it."""

import harness
from harness.sampler import FewStepLoraSampler


class FlashLcmSampler(FewStepLoraSampler):
    name = "flash-lcm"
    description = (
        "Base model + fused Flash LoRA (--lora_id, default jasperai/flash-sd; --lora_path wins), "
        "LCMScheduler with trailing timesteps, guidance 0."
    )


@harness.hookimpl
def register_samplers(register):
    register(FlashLcmSampler)
