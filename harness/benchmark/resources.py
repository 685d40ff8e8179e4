"""What a benchmark asks of the machine, checked before anything loads: a device a pipeline can run on, and
memory for one pipeline call.

The estimate reads the UNet's and the VAE's configs (and the weights' size from the safetensors headers) from
disk, with nothing loaded, and compares the peak of one call with what the device has free. Its factors are
fitted to the peak RSS of CPU calls (the embedded model and sd15-arch, 64-512 px) and err high.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models import loading as models
from harness.models.speed import SpeedOptions


def check_device(requested: str | None) -> None:
    """Refuse a ``--device`` no pipeline can run on, naming the ones this machine has, before anything loads.

    torch accepts names such as ``meta``, ``xpu`` or ``cuda:7`` on a one-GPU machine, which would fail only deep
    inside loading. CUDA or MPS missing altogether is left to :func:`harness.models.loading.resolve_device`, whose
    message says how to get them.
    """
    if requested is None:
        return
    try:
        device: torch.device | None = torch.device(requested)
    except RuntimeError:
        device = None
    if device is not None and device.type in ("cuda", "mps") and not _has(device.type):
        return
    gpus = torch.cuda.device_count() if _has("cuda") else 0
    names = ["cpu", *(["cuda", *(f"cuda:{index}" for index in range(gpus))] if gpus else []),
             *(["mps"] if _has("mps") else [])]
    if device is not None and str(device) in {*names, "cpu:0", "mps:0"}:
        return
    reason = f" (this machine has {gpus} GPU{'' if gpus == 1 else 's'})" if device is not None and gpus and \
        device.type == "cuda" else ""
    listing = f"one of: {', '.join(names)}" if len(names) > 1 else names[0]
    raise HarnessError(f"--device {requested} is not a device a pipeline can run on{reason}; use {listing}.")


def _has(device_type: str) -> bool:
    return torch.cuda.is_available() if device_type == "cuda" else torch.backends.mps.is_available()


# Peak memory of one pipeline call, from the model's architecture alone. The factors count the live activations
# per position of the largest stage, in units of that stage's channels; they are fitted to the peak RSS of float32
# calls on a CPU (the embedded model and sd15-arch, 64 to 512 pixels, 1 and 2 images) and rounded up, so the
# estimate errs high: it is there to refuse what cannot fit, not to promise that the rest will.
UNET_FACTOR = 32  # per latent position (times the batch) and channel of the UNet's first block
UNET_ATTENTION_FACTOR = 56  # the same when that block attends too (SD 1.5), with its wide feed-forward
VAE_FACTOR = 5  # per pixel and channel entering the decoder's full-resolution block (block_out_channels[1])
IMAGE_COPIES = 4  # the decoded batch as float32: the decoder's output, denormalized, on the CPU, as numpy
CALL_OVERHEAD = 64 * 2**20  # text encoding, the scheduler, the allocator's slack


@dataclass(frozen=True)
class CallMemory:
    """The estimated peak memory of one pipeline call, in bytes, by what holds it."""

    weights: int
    unet: int  # the UNet's activations, freed before the decoder runs
    decoder: int
    images: int
    overhead: int = CALL_OVERHEAD

    @property
    def total(self) -> int:
        return self.weights + max(self.unet, self.decoder) + self.images + self.overhead


def estimate_call_memory(unet: Mapping[str, Any], vae: Mapping[str, Any], height: int, width: int, images: int,
                         guided: bool, dtype: torch.dtype, speed: SpeedOptions, parameters: int = 0) -> CallMemory:
    """About the most memory one call of ``images`` images holds at once (the formula is above the factors)."""
    value = dtype.itemsize
    scale = _vae_scale(vae)
    latent = (height // scale) * (width // scale)
    unet_batch = images * (2 if guided else 1)  # classifier-free guidance doubles the UNet's batch
    factor = UNET_ATTENTION_FACTOR if "CrossAttn" in unet["down_block_types"][0] else UNET_FACTOR
    unet_bytes = unet_batch * latent * int(unet["block_out_channels"][0]) * value * factor
    tile = _first(vae.get("sample_size", max(height, width)))
    decoded_height, decoded_width = (min(height, tile), min(width, tile)) if speed.vae_tiling else (height, width)
    decoder_batch = 1 if speed.vae_slicing else images
    channels = vae["block_out_channels"]
    decoder_bytes = decoder_batch * decoded_height * decoded_width * int(channels[min(1, len(channels) - 1)]) * value \
        * VAE_FACTOR
    if speed.attention == "math":  # matmul + softmax hold all scores at once: two (positions x positions) matrices
        level = next((index for index, kind in enumerate(unet["down_block_types"]) if "CrossAttn" in kind), None)
        if level is not None:
            heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 1
            heads = heads[level] if isinstance(heads, list) else heads
            unet_bytes += 2 * unet_batch * int(heads) * (latent // 4**level) ** 2 * value
        if vae.get("mid_block_add_attention", True):
            positions = (decoded_height // scale) * (decoded_width // scale)
            decoder_bytes += 2 * decoder_batch * positions**2 * value
    return CallMemory(parameters * value, unet_bytes, decoder_bytes, IMAGE_COPIES * images * 3 * height * width * 4)


def native_size(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) a pipeline draws without --height/--width: the UNet's sample size times the VAE's scale."""
    size = unet["sample_size"]
    height, width = (size, size) if isinstance(size, int) else size
    return int(height) * _vae_scale(vae), int(width) * _vae_scale(vae)


def image_size(model: models.ModelSpec, height: int | None, width: int | None) -> tuple[int, int] | None:
    """(height, width) of the run's pictures: the options', else the model's native size; None when unknown
    before the model loads (a hub model not in the cache)."""
    if height and width:
        return height, width
    architecture = model_architecture(model)
    if architecture is None:
        return None
    try:
        native_height, native_width = native_size(architecture[0], architecture[1])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return height or native_height, width or native_width


def _vae_scale(vae: Mapping[str, Any]) -> int:
    return int(2 ** (len(vae["block_out_channels"]) - 1))


def _first(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def model_architecture(model: models.ModelSpec) -> tuple[dict[str, Any], dict[str, Any], int] | None:
    """The UNet's and the VAE's config and the weights' parameter count, read from disk with nothing loaded.

    None for a hub model that is not in the local cache (it is only downloaded when it loads) or a folder
    without those configs.
    """
    folder = Path(model.location)
    if not folder.is_dir():  # a hub id (sd15 too): its files are in the hub's cache, if anywhere
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model.location, "unet/config.json")
        except ValueError:  # a name the hub would refuse; loading will say so
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent.parent
    try:
        unet, vae = (json.loads((folder / part / "config.json").read_text(encoding="utf-8"))
                     for part in ("unet", "vae"))
    except (OSError, ValueError):
        return None
    if not isinstance(unet, dict) or not isinstance(vae, dict):
        return None
    return unet, vae, sum(_parameters(folder / part) for part in ("unet", "vae", "text_encoder"))


def _parameters(folder: Path) -> int:
    """The parameters in a component folder's safetensors files, from their headers (no weight is read).

    Of several files, the largest count: they are variants (``.fp16``) of the same weights.
    """
    from safetensors import SafetensorError, safe_open

    counts = [0]
    for path in folder.glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as weights:
                counts.append(sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()))
        except (OSError, SafetensorError):
            continue  # a damaged file: loading will name it
    return max(counts)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still take on ``device``: the GPU's free memory, or on a CPU the kernel's estimate
    (MemAvailable), capped by a container's memory limit; None where unknown (MPS, no /proc)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")),
                     None)
    limit = _container_room()
    return available if limit is None or available is None else min(available, limit)


def _container_room() -> int | None:
    """What a cgroup memory limit (v2, else v1) leaves free; None without one."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes a huge number for "no limit", v2 "max"
            return max(int(limit) - usage, 0)
    return None


def refuse_what_cannot_fit(model: models.ModelSpec, device: torch.device, dtype: torch.dtype, speed: SpeedOptions,
                           height: int | None, width: int | None, images: int, guided: bool) -> None:
    """Refuse, before anything loads, a call size whose estimated peak memory exceeds what the device has free.

    One such call (a 4096x4096 image on a CPU) can run for many minutes inside a single native operation
    that no Ctrl-C reaches, and then be killed for memory with nothing to show.
    """
    architecture = model_architecture(model)
    if architecture is None:
        return
    unet, vae, parameters = architecture
    asked = height or width
    try:
        native_height, native_width = native_size(unet, vae)
        height, width = height or native_height, width or native_width
        needed = estimate_call_memory(unet, vae, height, width, images, guided, dtype, speed, parameters)
    except (KeyError, IndexError, TypeError, ValueError):
        return  # not the Stable Diffusion layout the estimate knows; loading will tell
    available = available_memory(device)
    if available is None or needed.total <= available:
        return
    size = f"--height {height} --width {width}" if asked else f"the model's {height}x{width}"
    fixes = ["a smaller size", *(["--batch 1"] if images > 1 else []),
             *(["--vae-tiling"] if needed.decoder > needed.unet and not speed.vae_tiling else []),
             *(["--attention default"] if speed.attention == "math" else []), "another device"]
    gib = 2**30
    raise HarnessError(f"{size} with {images} image{'' if images == 1 else 's'} per call needs about "
                       f"{needed.total / gib:.1f} GiB for one call on {device}, but {available / gib:.1f} GiB are "
                       f"available; use {', '.join(fixes[:-1])}, or {fixes[-1]}.")
