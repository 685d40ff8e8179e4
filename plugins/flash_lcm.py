"""flash-lcm: Jasper's Flash Diffusion LoRA on Stable Diffusion 1.5, as the seed's demo.py runs it."""

from collections.abc import Callable

import harness
from harness import PresetLoraSampler, Sampler


class FlashLcmSampler(PresetLoraSampler):
    name = "flash-lcm"
    file_label = "flash"  # the seed's compare_baseline30_flash4_seed42.png
    description = (
        "Base model + fused Flash LoRA (--lora_id, default: the model's own, jasperai/flash-sd on SD 1.5; "
        "--lora_path wins unless --lora_id is given too; --lora_preset picks another few-step LoRA by name), "
        "LCMScheduler with trailing timesteps, guidance 0."
    )
    # --lora_path replaces the Flash LoRA, as in the seed's demo.py. Given both, --lora_id is flash-lcm's and
    # --lora_path local-student's, so one run can compare two LoRAs (PresetLoraSampler.lora_source).


@harness.hookimpl
def register_samplers(register: Callable[[type[Sampler]], None]) -> None:
    register(FlashLcmSampler)
