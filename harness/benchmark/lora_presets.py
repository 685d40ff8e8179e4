"""Few-step LoRAs by name (``--lora_preset``), and the base class of the samplers that take one.

A preset names a hub repository and file; nothing is looked up until a sampler uses it. On a model the
presets were not made for - the embedded model, a random-weight architecture - the model's own few-step LoRA
stands in for every preset, and the record says so. Offline, a preset whose file is not in the local Hugging
Face cache is refused in one line that names the preset, the repository and the fix.

Hyper-SD ships one LoRA per step count: the sampler loads the file for the step count it is asked to run
(swapping it, outside the timed calls, when the step count changes) and refuses step counts with no file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import harness.options
from harness.benchmark.sampler import FewStepLoraSampler, GenerationRequest, SamplerInfo
from harness.errors import HarnessError
from harness.models import loading as models
from harness.options import Options, setting

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

#: The file ``load_lora_weights`` reads from a repository when no file is named (diffusers' LORA_WEIGHT_NAME_SAFE).
DEFAULT_LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraPreset:
    """A few-step LoRA for Stable Diffusion 1.5 on the hub: one file for every step count, or one per step count."""

    name: str
    repo: str
    about: str
    files: Mapping[int, str] = field(default_factory=dict)  # step count -> file; empty: DEFAULT_LORA_FILE

    def file_for(self, steps: int | None) -> str:
        """The file to load for ``steps`` (HarnessError for a step count with no file of its own)."""
        if not self.files:
            return DEFAULT_LORA_FILE
        if steps is None or steps not in self.files:
            counts = sorted(self.files)
            listed = ", ".join(str(n) for n in counts[:-1]) + f" and {counts[-1]}"
            raise HarnessError(f"LoRA preset '{self.name}' has a file for {listed} steps only ({self.repo}), not "
                               f"{steps}; pass --steps {' '.join(map(str, counts))} or another --lora_preset.")
        return self.files[steps]


PRESETS: dict[str, LoraPreset] = {preset.name: preset for preset in (
    LoraPreset("lcm-lora", "latent-consistency/lcm-lora-sdv1-5", "LCM-LoRA (Luo et al. 2023, arXiv 2311.05556)"),
    LoraPreset("tcd", "h1t/TCD-SD15-LoRA",
               "Trajectory Consistency Distillation (Zheng et al. 2024, arXiv 2402.19159)"),
    LoraPreset("hyper-sd", "ByteDance/Hyper-SD",
               "Hyper-SD (Ren et al. 2024, arXiv 2404.13686), one LoRA per step count",
               {1: "Hyper-SD15-1step-lora.safetensors", 2: "Hyper-SD15-2steps-lora.safetensors",
                4: "Hyper-SD15-4steps-lora.safetensors", 8: "Hyper-SD15-8steps-lora.safetensors"}),
    LoraPreset("flash", models.FLASH_SD_LORA, "Flash Diffusion (Chadebec et al. 2024, arXiv 2406.02347)"),
)}


def own_lora(model: models.ModelSpec) -> str | None:
    """The LoRA that stands in for every preset on a model the presets were not made for: the embedded model's
    shipped LoRA, a random-weight architecture's generated one. None for SD 1.5 and models built on it."""
    if model.random_weights or (model.kind == "preset" and model.name == "embedded"):
        return model.default_lora
    return None


@dataclass(frozen=True)
class PresetChoice:
    """A preset resolved for one model: the hub file(s), or the model's own LoRA standing in for them."""

    preset: LoraPreset
    model: models.ModelSpec

    @property
    def stand_in(self) -> str | None:
        return own_lora(self.model)

    @property
    def by_steps(self) -> bool:
        """Whether the preset has a file per step count (and so refuses step counts without one)."""
        return bool(self.preset.files)

    @property
    def per_step(self) -> bool:
        """Whether what loads depends on the step count (and so loads when a step count is first asked for)."""
        return self.stand_in is None and self.by_steps

    def source(self, steps: int | None) -> models.LoraSource | None:
        """What to load for ``steps`` (None: a per-step preset before any step count is known).

        Refuses a step count the preset has no file for, on every model, so a run checked on the embedded model
        asks for nothing SD 1.5 cannot do; offline, refuses a hub file that is not in the local cache.
        """
        if self.preset.files and steps is not None:
            self.preset.file_for(steps)
        if self.stand_in is not None:
            return models.resolve_lora(None, self.stand_in)
        if self.per_step and steps is None:
            return None
        weight_name = self.preset.file_for(steps) if self.preset.files else None
        require_cached(self.preset, weight_name or DEFAULT_LORA_FILE)
        return models.LoraSource(self.preset.repo, weight_name, "hub")

    @property
    def label(self) -> str:
        """The LoRA as records name it."""
        if self.stand_in is not None:
            return self.stand_in
        return f"{self.preset.repo} (a file per step count)" if self.preset.files else self.preset.repo

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"lora_preset": self.preset.name, "lora_preset_repo": self.preset.repo}
        if self.preset.files:
            details["lora_preset_files"] = {str(steps): name for steps, name in sorted(self.preset.files.items())}
        if self.stand_in is not None:
            details["lora_preset_note"] = (
                f"{self.preset.repo} is for SD 1.5; on model '{self.model.name}' its own few-step LoRA "
                f"({self.stand_in}) stands in for preset '{self.preset.name}'")
        return details


def choose(name: str, model: models.ModelSpec) -> PresetChoice:
    if name not in PRESETS:
        raise HarnessError(f"unknown LoRA preset '{name}'; use one of: {', '.join(PRESETS)}.")
    return PresetChoice(PRESETS[name], model)


def require_cached(preset: LoraPreset, filename: str) -> None:
    """Offline (HF_HUB_OFFLINE), a preset's file must already be in the local Hugging Face cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(preset.repo, filename), str):
        return
    raise HarnessError(
        f"LoRA preset '{preset.name}' needs {preset.repo} ({filename}), which is not in the local Hugging Face cache "
        f"and the hub is offline (HF_HUB_OFFLINE); to fix: run `hf download {preset.repo} {filename}` once online, "
        "or pass --lora_path with a local copy of the LoRA."
    )


@dataclass(frozen=True)
class PresetOptions(Options):
    """The settings of every sampler that takes a LoRA preset; one ``--lora_preset`` option serves them all."""

    lora_preset: str | None = setting(
        None, "flash-lcm, tcd: a few-step SD 1.5 LoRA by name, fetched when first used: lcm-lora (latent-consistency/"
              "lcm-lora-sdv1-5), tcd (h1t/TCD-SD15-LoRA), hyper-sd (ByteDance/Hyper-SD, a file for each of --steps 1 "
              "2 4 8), flash (jasperai/flash-sd). Wins over --lora_path (then local-student's). On --model embedded: "
              "the shipped LoRA. Default: flash for flash-lcm, tcd for tcd.",
        choices=tuple(PRESETS))


class PresetLoraSampler(FewStepLoraSampler):
    """A fused few-step LoRA chosen by --lora_path, --lora_id or --lora_preset; subclasses pick the scheduler.

    Which LoRA: --lora_preset when given; else --lora_id when --lora_path is given too (--lora_path is then
    local-student's), else --lora_path, else --lora_id; else ``default_preset``, or without one the model's own.
    """

    Options: ClassVar[type[harness.options.Options]] = PresetOptions
    #: The preset used when no LoRA is named; None: the model's own few-step LoRA (``ModelSpec.default_lora``).
    default_preset: ClassVar[str | None] = None

    preset: PresetChoice | None = None
    loaded_lora: models.LoraSource | None = None

    def preset_choice(self) -> PresetChoice | None:
        """The preset this sampler samples with, or None when a LoRA folder or hub id decides."""
        options = self.options
        name = options.lora_preset if isinstance(options, PresetOptions) else None
        if name is not None and self.config.lora_id:
            raise HarnessError(f"pass either --lora_id or --lora_preset to {self.name}, not both.")
        if name is None and (self.config.lora_path or self.config.lora_id):
            return None
        name = name or self.default_preset
        return choose(name, self.config.model) if name is not None else None

    def lora_source(self) -> models.LoraSource | None:
        if self.config.lora_id and self.config.lora_path:
            return models.resolve_lora(None, self.config.lora_id)
        return super().lora_source()

    def scheduler(self, config: Mapping[str, Any]) -> Any:
        """The scheduler this sampler runs, made from the model's own scheduler config."""
        return models.few_step_scheduler(config)

    def preflight(self, steps: Sequence[int]) -> None:
        """Refuse, before anything loads, a preset without a file for one of ``steps`` or, offline, one not cached."""
        preset = self.preset_choice()
        if preset is None:
            return
        if preset.by_steps:  # every step count first: a wrong one is the whole run's problem, not a download's
            for steps_count in steps:
                preset.preset.file_for(steps_count)
        counts: list[int | None] = [*steps] or [None]
        for count in counts:
            preset.source(count)

    def load(self) -> None:
        # The preset first: a LoRA that cannot be had is told before the base model spends time loading.
        self.preset = self.preset_choice()
        if self.preset is not None:
            self.preset.source(None)
        super().load()

    def prepare(self, pipe: StableDiffusionPipeline) -> None:
        if self.preset is None:
            source = self.lora_source()
            assert source is not None, "the model has no default LoRA and neither --lora_path nor --lora_id was given"
            named = source.weight_name
            self.lora_label = source.location if named is None else f"{source.location}/{named}"
        else:
            source = self.preset.source(None)
            self.lora_label = self.preset.label
        if source is not None:
            self.lora_layers = models.load_lora(pipe, source, fuse=self.config.speed.fuse_lora)
            self.loaded_lora = source
        self.lora_fused = self.config.speed.fuse_lora
        pipe.scheduler = self.scheduler(pipe.scheduler.config)

    def use_lora_for(self, steps: int) -> None:
        """Load the per-step preset's file for ``steps`` in place of the one loaded (no-op when it is loaded)."""
        if self.preset is None or not self.preset.by_steps:
            return
        source = self.preset.source(steps)  # refuses a step count without a file, stand-in or not
        if source is None or source == self.loaded_lora:
            return
        pipe = self.loaded_pipeline()
        if self.loaded_lora is not None:
            if self.lora_fused:
                pipe.unfuse_lora()
            pipe.unload_lora_weights()  # type: ignore[no-untyped-call]  # diffusers leaves it unannotated
            self.loaded_lora = None
        self.lora_layers = models.load_lora(pipe, source, fuse=self.config.speed.fuse_lora)
        self.loaded_lora = source
        if self.config.speed.channels_last:  # a fused weight is a new tensor: give it the layout the option asks for
            import torch

            pipe.unet.to(memory_format=torch.channels_last)

    def check(self, request: GenerationRequest) -> list[str]:
        # The runner checks every call before timing any: the step count's LoRA loads here, outside the timed region.
        self.use_lora_for(request.steps)
        return super().check(request)

    def generate(self, request: GenerationRequest) -> list[Any]:
        self.use_lora_for(request.steps)  # a no-op after check(); there for callers that skip it
        return super().generate(request)

    def describe(self) -> SamplerInfo:
        info = super().describe()
        if self.preset is not None:
            info.details.update(self.preset.details())
        return info
