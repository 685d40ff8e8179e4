"""Which model and LoRA a run uses, and loading them with diffusers' own API.

Every model - SD 1.5 from the hub, a local diffusers folder, the embedded tiny model - goes through the
same ``StableDiffusionPipeline.from_pretrained`` / ``load_lora_weights`` / ``fuse_lora`` path, so the
embedded model exercises exactly the code GPU users run.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.errors import HarnessError, one_line
from harness.models import architectures, lora_io

if TYPE_CHECKING:
    # The defining modules, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_lcm import LCMScheduler

SD15_MIRROR = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# The seed's model id; the repository was deleted from the hub in 2024.
SD15_SEED_ID = "runwayml/stable-diffusion-v1-5"
FLASH_SD_LORA = "jasperai/flash-sd"
# Random-weight architectures get a random LoRA of this rank, so fusing and --no-fuse cost what they would.
GENERATED_LORA = "generated"
GENERATED_LORA_RANK = 64
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

SD15_PROMPT = "a beautiful landscape with mountains and a lake, sunset, highly detailed"
# One the shipped model draws right at every step count of the quick start: the fidelity judge gave 1.00 to the
# first image (seed 42) of the 30-step baseline and of flash-lcm at 2, 4 and 8 steps, and 0.94 / 0.84 / 0.98 /
# 0.97 over 8 seeds (the old "a small red circle at the top ..." named a position the model does not follow).
EMBEDDED_PROMPT = "a large orange circle on a black background"

OFFLINE_FIX = (
    "run `huggingface-cli login` (and accept the model licence on the hub), check the network, "
    "or pass --model embedded to use the model that ships with harness"
)


@dataclass(frozen=True)
class ModelSpec:
    """A model choice resolved to something ``from_pretrained`` can load."""

    name: str  # what the user asked for, e.g. "sd15", "embedded", a hub id or a folder
    location: str  # hub id or local folder handed to from_pretrained
    kind: str  # "preset", "hub" or "local"
    default_lora: str | None  # the few-step LoRA flash-lcm uses when --lora_id/--lora_path are absent
    default_prompt: str
    notice: str | None = None  # one line to show the user about how the name was resolved
    note: str | None = None  # recorded with every measurement, e.g. "random weights, timing only"

    @property
    def random_weights(self) -> bool:
        return self.kind == "architecture"


def default_model_name(device: torch.device) -> str:
    return "sd15" if device.type == "cuda" else "embedded"


def resolve_model(name: str) -> ModelSpec:
    if name == "embedded":
        from harness.models.embedded import embedded_lora, embedded_model

        return ModelSpec(name, str(embedded_model()), "preset", str(embedded_lora()), EMBEDDED_PROMPT)
    if name == "sd15":
        return ModelSpec(name, SD15_MIRROR, "preset", FLASH_SD_LORA, SD15_PROMPT)
    if name in architectures.ARCHITECTURES:
        return ModelSpec(name, str(architectures.ARCHITECTURES[name]), "architecture", GENERATED_LORA, SD15_PROMPT,
                         note=architectures.RANDOM_WEIGHTS_NOTE)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise HarnessError(
                f"model folder '{path}' has no model_index.json; pass a diffusers pipeline folder "
                "(as written by save_pretrained) or a preset: sd15, embedded."
            )
        return ModelSpec(name, str(path), "local", FLASH_SD_LORA, SD15_PROMPT)
    if name == SD15_SEED_ID:
        if _cached_on_disk(SD15_SEED_ID):
            return ModelSpec(name, SD15_SEED_ID, "hub", FLASH_SD_LORA, SD15_PROMPT)
        notice = (
            f"{SD15_SEED_ID} was removed from the hub; using its maintained mirror {SD15_MIRROR} "
            "(the same weights)."
        )
        return ModelSpec(name, SD15_MIRROR, "hub", FLASH_SD_LORA, SD15_PROMPT, notice)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return ModelSpec(name, name, "hub", FLASH_SD_LORA, SD15_PROMPT)
    raise HarnessError(
        f"model '{name}' is not a preset, an existing folder or a hub id; "
        "use sd15, sd15-arch, embedded, owner/name or a path to a diffusers folder."
    )


def _cached_on_disk(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise HarnessError(f"unknown device '{requested}'; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(
            "CUDA is not available; install a CUDA build of PyTorch (see the README's GPU section) "
            "or pass --device cpu."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HarnessError("MPS is not available on this machine; pass --device cpu.")
    return device


DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as the seed does), fp32 elsewhere, unless the user says otherwise."""
    if requested is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[requested]


def load_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline from safetensors only; clear one-line errors otherwise."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    if spec.kind == "architecture":
        return architectures.build_pipeline(Path(spec.location), device, dtype)
    try:
        with warnings.catch_warnings():
            # diffusers >= 0.36 renames torch_dtype to dtype; the old name keeps older versions working.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                spec.location,
                torch_dtype=dtype,
                use_safetensors=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
    except Exception as error:  # noqa: BLE001 - diffusers/hub raise many types; all mean "cannot load"
        raise HarnessError(_load_failure(f"model '{spec.name}' ({spec.location})", error, spec.kind)) from None
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]  # diffusers leaves it unannotated
    return pipe.to(device)


def _load_failure(what: str, error: Exception, kind: str) -> str:
    reason = one_line(error)
    if kind == "local":
        return f"cannot load {what}: {reason}. Check that the folder is complete (re-save it with save_pretrained)."
    return f"cannot load {what}: {reason}. To fix: {OFFLINE_FIX}."


@dataclass(frozen=True)
class LoraSource:
    location: str  # a local folder or a hub id
    weight_name: str | None  # a file inside the folder, when the user named a file
    kind: str  # "local", "hub" or "generated" (random weights for a random-weight architecture)


def resolve_lora(lora_path: str | None, lora_id: str | None) -> LoraSource | None:
    """--lora_path wins over --lora_id (the seed's rule). Only safetensors files are accepted."""
    if lora_path:
        path = Path(lora_path).expanduser()
        if not path.exists():
            raise HarnessError(f"--lora_path '{path}' does not exist; pass the folder that holds the LoRA "
                               "(e.g. .../lora/final).")
        if path.is_file():
            _refuse_pickle(path)
            if path.suffix != ".safetensors":
                raise HarnessError(
                    f"--lora_path '{path}' is not a .safetensors file; pass a LoRA saved in safetensors."
                )
            return LoraSource(str(path.parent), path.name, "local")
        if not path.is_dir():
            raise HarnessError(f"--lora_path '{path}' is not a file or folder; pass the LoRA folder or its "
                               ".safetensors file.")
        safetensors = sorted(path.glob("*.safetensors"))
        if not safetensors:
            pickled = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                _refuse_pickle(pickled[0])
            raise HarnessError(
                f"--lora_path '{path}' holds no .safetensors LoRA weights; pass the folder with "
                "pytorch_lora_weights.safetensors (e.g. checkpoints/RUN/lora/final)."
            )
        return LoraSource(str(path), None, "local")
    if lora_id == GENERATED_LORA:
        return LoraSource(GENERATED_LORA, None, "generated")
    if lora_id:
        if Path(lora_id).expanduser().exists():
            return resolve_lora(lora_id, None)
        return LoraSource(lora_id, None, "hub")
    return None


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise HarnessError(
            f"refusing to load '{path}': pickled weights can run code when loaded. harness loads "
            "safetensors only; convert it with safetensors.torch.save_file(torch.load(path, "
            "weights_only=True), 'pytorch_lora_weights.safetensors') where you trust the file."
        )


def load_lora(pipe: StableDiffusionPipeline, source: LoraSource, fuse: bool = True) -> int:
    """Load a LoRA with diffusers' load_lora_weights() and, as the seed does, fuse it; return the number of layers
    it changes (the records' ``lora_layers``).

    A PEFT adapter folder, and a file whose keys mix diffusers' and PEFT's naming, go through lora_io instead:
    load_lora_weights would silently skip the one and load only part of the other. A LoRA that changes no layer
    (no tensors, only zeros, keys of no known prefix, another architecture's layers) is refused in one line: it
    would be measured and scored as if it did something.
    """
    peft_folder = lora_io.peft_adapter_folder(source.location, source.weight_name) if source.kind == "local" else None
    local_file = _checked_lora_file(source) if source.kind == "local" else None
    targets = (getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None))
    before = lora_io.lora_adapters(*targets)
    try:
        with _lora_load_errors_unlogged():
            _load_lora_weights(pipe, source, peft_folder, local_file)
        changed, loaded, unscaled = lora_io.changed_layers(*targets, skip=before)
        reason = lora_io.inert_reason(local_file, loaded, unscaled) if not changed else None
    except Exception as error:  # noqa: BLE001
        reason = one_line(error)
        if source.kind == "hub":
            raise HarnessError(f"cannot load LoRA '{source.location}': {reason}. To fix: {OFFLINE_FIX}.") from None
        raise HarnessError(_local_lora_failure(source, reason)) from None
    if reason is not None:
        raise HarnessError(_inert_lora_failure(source, reason))
    if fuse:
        pipe.fuse_lora()
    return changed


def _inert_lora_failure(source: LoraSource, reason: str) -> str:
    where = f"LoRA '{source.location}'" if source.kind == "hub" else f"LoRA from '{source.location}'"
    return (f"{where} changes nothing in this model: {reason.rstrip('.')}. Pass a diffusers LoRA trained for this "
            "base model (e.g. .../lora/final).")


def _load_lora_weights(pipe: StableDiffusionPipeline, source: LoraSource, peft_folder: Path | None,
                       local_file: Path | None) -> None:
    if peft_folder is not None:
        lora_io.load_peft_adapter(pipe, peft_folder)
    elif local_file is not None and lora_io.mixes_key_namings(lora_io.safetensors_header(local_file)):
        lora_io.load_mixed_naming_lora(pipe, local_file)
    elif source.kind == "generated":
        from harness.models.embedded import random_lora_state

        rank = GENERATED_LORA_RANK
        pipe.load_lora_weights(random_lora_state(pipe, rank=rank, alpha=rank))
    else:
        # The checked file by name: diffusers' own guess in a folder of several would be listing order.
        weight_name = local_file.name if local_file is not None else source.weight_name
        pipe.load_lora_weights(source.location, weight_name=weight_name, use_safetensors=True)


@contextmanager
def _lora_load_errors_unlogged() -> Iterator[None]:
    """diffusers logs a failed LoRA load (torch's whole multi-line message) before raising it; harness reports
    the raised error in one line instead, so that log is held back while a LoRA loads."""
    logger = logging.getLogger("diffusers.loaders.peft")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _checked_lora_file(source: LoraSource) -> Path | None:
    """The local file a LoRA loads from, its safetensors header checked and its values finite (None: no file).

    A damaged file is the cannot-load line before anything maps it; a LoRA trained into NaN or inf would load
    silently and sample black images, so it is named here.
    """
    path = lora_io.lora_weights_file(Path(source.location), source.weight_name)
    if path is None:
        return None  # nothing to load: diffusers says so in the cannot-load line
    try:
        broken, total = lora_io.non_finite_tensors(path)
    except ValueError as error:
        raise HarnessError(_local_lora_failure(source, str(error))) from None
    if broken:
        raise HarnessError(f"--lora_path '{path}' holds NaN or inf values (in {len(broken)} of {total} tensors, e.g. "
                           f"{broken[0][:100]!r}); it is broken: retrain it or pass another LoRA.")
    return path


def _local_lora_failure(source: LoraSource, reason: str) -> str:
    return (f"cannot load LoRA from '{source.location}': {reason.rstrip('.')}. Check that it is a diffusers LoRA for "
            "this base model, saved in safetensors.")


def few_step_scheduler(scheduler_config: Mapping[str, Any]) -> LCMScheduler:
    """The scheduler few-step LoRAs sample with (the seed's): LCMScheduler with trailing timesteps."""
    from diffusers.schedulers.scheduling_lcm import LCMScheduler

    scheduler: LCMScheduler = LCMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    return scheduler


def cpu_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One seeded CPU generator per image: the starting noise is then the same on every device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def quiet_libraries() -> None:
    """diffusers/transformers log progress bars and notices on every load; harness reports instead.

    Set DIFFUSERS_VERBOSITY / TRANSFORMERS_VERBOSITY to get them back.
    """
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers.utils.logging
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_progress_bar()
