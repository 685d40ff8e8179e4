"""Pipelines with a published architecture and random weights: SD 1.5-scale timing without a download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    # The defining module, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = {"sd15-arch": CONFIGS / "sd15-arch"}
RANDOM_WEIGHTS_NOTE = "random weights, timing only"


def build_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StableDiffusionPipeline:
    """Build every component from ``folder``'s configs directly on ``device`` (no CPU round trip)."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_pndm import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.models.embedded import build_tokenizer

    def config(component: str, name: str = "config.json") -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((folder / component / name).read_text())
        return loaded

    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(**config("text_encoder"), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text_encoder = CLIPTextModel(text_config)
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
        # transformers wraps PreTrainedModel.to in functools.wraps(Module.to): type checkers take dtype for self.
        text_encoder = text_encoder.to(dtype)  # type: ignore[arg-type]
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(config("scheduler", "scheduler_config.json")),
        # diffusers annotates both without None, though it documents None for a pipeline without them.
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,  # type: ignore[arg-type]
    )
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]  # diffusers leaves it unannotated
    return pipe
