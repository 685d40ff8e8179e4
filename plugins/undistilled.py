"""undistilled: the base model with the few-step samplers' schedule and no LoRA - what distillation must beat.

It samples exactly like ``flash-lcm`` and ``local-student`` (LCMScheduler, trailing timesteps, guidance 0)
but with the base UNet, so "student vs undistilled at 4 steps" isolates what the LoRA learned.
"""

import harness
from harness import DiffusersSampler


class UndistilledSampler(DiffusersSampler):
    name = "undistilled"
    description = (
        "Base model, no LoRA, the few-step schedule (LCMScheduler trailing, guidance 0): distillation's floor."
    )

    def prepare(self, pipe) -> None:
        pipe.scheduler = harness.few_step_scheduler(pipe.scheduler.config)


@harness.hookimpl
def register_samplers(register):
    register(UndistilledSampler)
