"""Pipelines with a published architecture and random weights: SD 1.5-scale timing without a download."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = {"sd15-arch": CONFIGS / "sd15-arch"}
RANDOM_WEIGHTS_NOTE = "random weights, timing only"


def build_pipeline(folder: Path, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Build every component from ``folder``'s configs directly on ``device`` (no CPU round trip)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from harness.embedded import build_tokenizer

    def config(component: str, name: str = "config.json") -> dict:
        return json.loads((folder / component / name).read_text())

    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(**config("text_encoder"), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config("unet"))
        vae = AutoencoderKL.from_config(config("vae"))
        text_encoder = CLIPTextModel(text_config)
    if dtype != torch.float32:
        unet, vae, text_encoder = unet.to(dtype), vae.to(dtype), text_encoder.to(dtype)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(config("scheduler", "scheduler_config.json")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
