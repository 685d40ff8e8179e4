"""vanilla-sd: the base model with its own scheduler and classifier-free guidance - the seed's baseline."""

import harness
from harness import DiffusersSampler


class VanillaSdSampler(DiffusersSampler):
    name = "vanilla-sd"
    description = "Base model, no LoRA, its default scheduler, --baseline_steps (30) at --baseline_guidance (7.5)."
    is_baseline = True


@harness.hookimpl
def register_samplers(register):
    register(VanillaSdSampler)
