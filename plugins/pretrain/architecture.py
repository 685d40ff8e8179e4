"""The tiny model's parts, SD 1.5's classes at a small size (VAE, UNet, text encoder), and the denoising
loss of the UNet stage."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from harness_plugins.pretrain.config import PretrainConfig

from harness import (
    NoiseSchedule,
)


def build_vae(config: PretrainConfig, resolution: int):
    from diffusers import AutoencoderKL

    blocks = len(config.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=tuple(config.vae_channels),
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, layers_per_block=1, latent_channels=4,
                         norm_num_groups=min(32, config.vae_channels[0]), sample_size=resolution)


def build_unet(config: PretrainConfig, sample_size: int):
    from diffusers import UNet2DConditionModel

    plain = config.unet_blocks_without_attention
    attending = len(config.unet_channels) - plain
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attending,
        up_block_types=("CrossAttnUpBlock2D",) * attending + ("UpBlock2D",) * plain,
        cross_attention_dim=config.text_width, attention_head_dim=8,
        norm_num_groups=min(32, config.unet_channels[0]))


def attending_blocks(down_block_types: Sequence[str]) -> str:
    """Which UNet blocks attend to the caption, in words: "blocks 2-4 of 4"."""
    attending = [index + 1 for index, kind in enumerate(down_block_types) if kind.startswith("CrossAttn")]
    span = f"block {attending[0]}" if len(attending) == 1 else f"blocks {attending[0]}-{attending[-1]}"
    return f"{span} of {len(down_block_types)}"


def build_text_encoder(config: PretrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        hidden_size=config.text_width, num_hidden_layers=config.text_layers,
        num_attention_heads=max(1, config.text_width // 16), intermediate_size=4 * config.text_width,
        max_position_embeddings=tokenizer.model_max_length, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


class TextToImage(torch.nn.Module):
    """The UNet and the text encoder as one trained module, for accelerate and the checkpoints."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


def denoising_losses(unet, text_encoder, tokenizer, schedule: NoiseSchedule, latents: torch.Tensor,
                     captions: Sequence[str], timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training loss of each example: mean squared error of the UNet's output against its target (v or noise)
    for ``latents`` noised with ``noise`` at ``timesteps``, the captions read by ``text_encoder``."""
    tokens = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(latents.device)
    text_states = text_encoder(tokens)[0]
    noisy = schedule.add_noise(latents, noise, timesteps)
    output = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
    alpha, sigma = schedule.alpha_sigma(timesteps, latents)
    target = alpha * noise - sigma * latents if schedule.prediction_type == "v_prediction" else noise
    return (output.float() - target).pow(2).flatten(1).mean(dim=1)


