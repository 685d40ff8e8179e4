"""What a sampler plugin implements.

A sampler turns (prompt, steps, guidance, seeds) into images and says what it is. It never times
itself, never writes files and never prints tables: ``harness.benchmark.runner`` and
``harness.benchmark.timing`` do that, identically for every sampler.
"""

from __future__ import annotations

import copy
import gc
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

import harness.options
from harness.errors import HarnessError
from harness.models import loading as models
from harness.models.speed import SpeedOptions, apply_speed_options, describe_speed
from harness.options import Options

if TYPE_CHECKING:
    # The defining module, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline


@dataclass(frozen=True)
class GenerationRequest:
    """One call: ``len(seeds)`` images of one prompt, image ``i`` drawn from ``seeds[i]``."""

    prompt: str
    steps: int
    guidance_scale: float
    seeds: tuple[int, ...]
    height: int | None = None
    width: int | None = None

    @property
    def num_images(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class SamplerConfig:
    """Run settings every sampler may need (its own settings are ``Sampler.options``)."""

    model: models.ModelSpec
    device: torch.device
    dtype: torch.dtype
    lora_path: str | None = None
    lora_id: str | None = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)


@dataclass
class SamplerInfo:
    """What a loaded sampler is, written into every record it produces."""

    model: str
    scheduler: str
    lora: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class Sampler(ABC):
    """Base class for sampler plugins.

    Subclasses set ``name`` and ``description``, may declare their own settings as an ``Options`` dataclass
    (a subclass of :class:`harness.options.Options` whose :func:`harness.options.setting` fields become
    ``harness bench`` options; the values arrive typed in ``self.options``), and implement :meth:`load`,
    :meth:`generate` and :meth:`describe`. ``components`` lets the runner count UNet evaluations and time
    the text encoder, denoiser and decoder separately; samplers without such modules return ``{}``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: A baseline sampler runs at --baseline_steps / --baseline_guidance and writes to the baseline folder.
    is_baseline: ClassVar[bool] = False
    #: The guidance scale a few-step sampler runs at (LCM-style samplers need none).
    default_guidance: ClassVar[float] = 0.0
    #: The sampler's name in comparison-grid file names (compare_baseline30_<label>4.png); default: ``name``.
    file_label: ClassVar[str] = ""
    #: The sampler's own settings; harness bench makes one option per field.
    Options: ClassVar[type[Options]] = Options

    # ``harness.options.Options``: inside the class body, ``Options`` is the class attribute above.
    def __init__(self, config: SamplerConfig, options: harness.options.Options | None = None) -> None:
        self.config = config
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def load(self) -> None:
        """Build or load everything once; called before any generation, timed as ``load_s``."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> list[Any]:
        """Return ``request.num_images`` PIL images; the same request must give the same pixels."""

    @abstractmethod
    def describe(self) -> SamplerInfo:
        """What this loaded sampler is (model, scheduler, LoRA), written into every record it produces."""

    def check(self, request: GenerationRequest) -> list[str]:
        """Raise HarnessError if ``request`` cannot run; return warnings worth showing the user."""
        return []

    def preflight(self, steps: Sequence[int]) -> None:
        """Raise HarnessError if this sampler cannot run ``steps`` as configured; cheap, before :meth:`load`
        (nothing is loaded, only settings and local caches are read). Default: nothing to check."""

    def components(self) -> dict[str, torch.nn.Module]:
        """Modules named ``text_encoder``, ``denoiser`` and ``decoder``, where the sampler has them."""
        return {}

    def unload(self) -> None:
        """Free memory before the next sampler loads."""


class DiffusersSampler(Sampler):
    """A sampler around a diffusers ``StableDiffusionPipeline``; subclasses adapt it in :meth:`prepare`."""

    pipeline: StableDiffusionPipeline | None = None
    lora_label: str | None = None
    lora_fused: bool | None = None
    lora_layers: int | None = None  # layers the loaded LoRA changes (load_lora counts them)

    def loaded_pipeline(self) -> StableDiffusionPipeline:
        """The pipeline :meth:`load` built (``None`` before it and after :meth:`unload`)."""
        assert self.pipeline is not None, f"{type(self).__name__}.load() has not run"
        return self.pipeline

    def prepare(self, pipe: StableDiffusionPipeline) -> None:
        """Change the freshly loaded pipeline in place (LoRA, scheduler). Default: use it as it is."""

    def load(self) -> None:
        pipe = models.load_pipeline(self.config.model, self.config.device, self.config.dtype)
        self.prepare(pipe)
        apply_speed_options(pipe, self.config.speed)
        self.pipeline = pipe

    def generate(self, request: GenerationRequest) -> list[Any]:
        images: list[Any] = self.loaded_pipeline()(**self.call_arguments(request)).images
        return images

    def call_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """Keyword arguments of the pipeline call; extend them to pass sampler-specific settings."""
        return {
            "prompt": request.prompt,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": request.num_images,
            "generator": models.cpu_generators(request.seeds),
            "height": request.height,
            "width": request.width,
        }

    def check(self, request: GenerationRequest) -> list[str]:
        scheduler = copy.deepcopy(self.loaded_pipeline().scheduler)
        name, limit = type(scheduler).__name__, scheduler.config.num_train_timesteps
        try:
            if request.steps > limit:
                raise ValueError(f"the model was trained on {limit} timesteps")
            scheduler.set_timesteps(request.steps)
        except ValueError as error:
            reason = str(error).split(". ")[0]
            raise HarnessError(f"{request.steps} steps is more than {name} can run ({reason}); "
                               "pass fewer --steps.") from None
        tokenizer = self.loaded_pipeline().tokenizer
        tokens = len(tokenizer(request.prompt).input_ids)
        if tokens > tokenizer.model_max_length:
            return [f"the prompt '{request.prompt[:40]}...' is {tokens} tokens long; the text encoder reads the "
                    f"first {tokenizer.model_max_length}, the rest is cut off."]
        return []

    def describe(self) -> SamplerInfo:
        pipe = self.loaded_pipeline()
        scheduler = pipe.scheduler
        spacing = scheduler.config.get("timestep_spacing")
        return SamplerInfo(
            model=self.config.model.location if self.config.model.kind == "hub" else self.config.model.name,
            scheduler=type(scheduler).__name__ + (f" ({spacing})" if spacing else ""),
            lora=self.lora_label,
            details={"model_location": self.config.model.location, "model_note": self.config.model.note,
                     "lora_fused": self.lora_fused, "lora_layers": self.lora_layers, **describe_speed(pipe)},
        )

    def components(self) -> dict[str, torch.nn.Module]:
        pipe = self.loaded_pipeline()
        return {"text_encoder": pipe.text_encoder, "denoiser": pipe.unet, "decoder": pipe.vae.decoder}

    def unload(self) -> None:
        self.pipeline = None
        if self.config.device.type == "cuda":
            gc.collect()  # diffusers and peft modules hold reference cycles; free them before the cache
            torch.cuda.empty_cache()


class FewStepLoraSampler(DiffusersSampler):
    """Base model + a fused few-step LoRA + LCMScheduler with trailing timesteps, guidance 0."""

    def lora_source(self) -> models.LoraSource | None:
        return models.resolve_lora(self.config.lora_path, self.config.lora_id or self.config.model.default_lora)

    def prepare(self, pipe: StableDiffusionPipeline) -> None:
        source = self.lora_source()
        assert source is not None, "the model has no default LoRA and neither --lora_path nor --lora_id was given"
        self.lora_layers = models.load_lora(pipe, source, fuse=self.config.speed.fuse_lora)
        self.lora_fused = self.config.speed.fuse_lora
        self.lora_label = source.location if source.weight_name is None else f"{source.location}/{source.weight_name}"
        pipe.scheduler = models.few_step_scheduler(pipe.scheduler.config)
