"""Speed options of diffusers samplers; each one is recorded in the run's config and sampler info."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from harness.options import Options, setting

if TYPE_CHECKING:
    # The defining module, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

ATTENTION_CHOICES = ("default", "sdpa", "math")


@dataclass(frozen=True)
class SpeedOptions(Options):
    """How a diffusers pipeline runs; ``harness bench`` makes one option of each."""

    compile: bool = setting(False, "torch.compile the UNet and VAE decoder (compile time lands in first_call_s).")
    channels_last: bool = setting(False, "Channels-last memory format for the UNet and VAE.")
    attention: str = setting("default", "Attention kernel: diffusers' default, torch SDPA, or plain matmul + softmax.",
                             choices=ATTENTION_CHOICES)
    fuse_lora: bool = setting(True, "Fuse the LoRA into the base weights, as the seed does; --no-fuse keeps it "
                                    "unfused (to measure what fusing buys).", flags=("--fuse/--no-fuse",))
    vae_slicing: bool = setting(False, "Decode a batch one image at a time.")
    vae_tiling: bool = setting(False, "Decode large images tile by tile.")


def apply_speed_options(pipe: StableDiffusionPipeline, options: SpeedOptions) -> None:
    """Apply everything but ``fuse_lora`` (which the LoRA loading honours) to a loaded pipeline."""
    if options.attention != "default":
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processor = AttnProcessor2_0 if options.attention == "sdpa" else AttnProcessor
        pipe.unet.set_attn_processor(processor())
        pipe.vae.set_attn_processor(processor())
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.vae_slicing:
        pipe.vae.enable_slicing()
    if options.vae_tiling:
        pipe.vae.enable_tiling()
    if options.compile:
        pipe.unet = torch.compile(pipe.unet)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder)


def describe_speed(pipe: StableDiffusionPipeline) -> dict[str, Any]:
    """What the pipeline actually runs with, read back from the modules themselves."""
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    return {
        "attention_processors": sorted(processors),
        "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not conv.weight.is_contiguous(),
        "compiled": isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule),
        "vae_slicing": bool(getattr(pipe.vae, "use_slicing", False)),
        "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)),
    }
