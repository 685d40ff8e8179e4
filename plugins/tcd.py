"""tcd: Trajectory Consistency Distillation (Zheng et al. 2024, arXiv 2402.19159) - a TCD LoRA sampled by TCDScheduler.

TCD's sampler is stochastic: at every step it goes back to an earlier time on the predicted trajectory and adds
fresh noise in proportion to gamma (``--tcd-gamma``, the scheduler call's ``eta``); gamma 0 is deterministic.
The images stay reproducible: the noise is drawn from the call's seeded generators.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import harness
from harness import GenerationRequest, PresetLoraSampler, PresetOptions, Sampler, SamplerInfo, setting


@dataclass(frozen=True)
class TcdOptions(PresetOptions):
    tcd_gamma: float = setting(0.3, "tcd: gamma, the stochasticity of TCD's sampling (TCDScheduler's eta): 0 is "
                                    "deterministic; 0.3 as the paper and the model card recommend, higher for more "
                                    "steps.", minimum=0.0, maximum=1.0)


class TcdSampler(PresetLoraSampler):
    name = "tcd"
    description = ("Base model + fused TCD LoRA (--lora_preset, default tcd: h1t/TCD-SD15-LoRA on SD 1.5, the "
                   "shipped LoRA on embedded; --lora_path / --lora_id as flash-lcm), TCDScheduler with gamma "
                   "--tcd-gamma, guidance 0.")
    Options = TcdOptions
    default_preset = "tcd"

    def scheduler(self, config: Mapping[str, Any]) -> Any:
        from diffusers.schedulers.scheduling_tcd import TCDScheduler

        return TCDScheduler.from_config(config)

    @property
    def gamma(self) -> float:
        options = self.options
        return options.tcd_gamma if isinstance(options, TcdOptions) else TcdOptions().tcd_gamma

    def call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        return {**super().call_arguments(request), "eta": self.gamma}

    def describe(self) -> SamplerInfo:
        info = super().describe()
        info.details["gamma"] = self.gamma
        return info


@harness.hookimpl
def register_samplers(register: Callable[[type[Sampler]], None]) -> None:
    register(TcdSampler)
