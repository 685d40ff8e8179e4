"""Speed options of diffusers samplers; each one is recorded in the run's config and sampler info."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTENTION_CHOICES = ("default", "sdpa", "math")


@dataclass(frozen=True)
class SpeedOptions:
    compile: bool = False  # torch.compile the UNet and the VAE decoder; compile time lands in first_call_s
    channels_last: bool = False  # NHWC memory format for the UNet and the VAE
    attention: str = "default"  # default: diffusers' choice; sdpa: torch's fused kernel; math: matmul + softmax
    fuse_lora: bool = True  # fuse the LoRA into the base weights, as the seed does
    vae_slicing: bool = False  # decode a batch one image at a time (memory)
    vae_tiling: bool = False  # decode large images tile by tile (memory)


def apply_speed_options(pipe, options: SpeedOptions) -> None:
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


def describe_speed(pipe) -> dict:
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
