"""local-student: a LoRA trained by `harness train`, scheduled exactly like flash-lcm."""

import harness
from harness import FewStepLoraSampler, HarnessError


class LocalStudentSampler(FewStepLoraSampler):
    name = "local-student"
    description = "A LoRA you trained (--lora_path .../lora/final), LCMScheduler trailing, guidance 0."

    def lora_source(self) -> harness.LoraSource:
        if not self.config.lora_path:
            raise HarnessError(
                "local-student needs --lora_path; pass the folder your training wrote, "
                "e.g. --lora_path ./checkpoints/RUN/lora/final."
            )
        return harness.resolve_lora(self.config.lora_path, None)


@harness.hookimpl
def register_samplers(register):
    register(LocalStudentSampler)
