"""Stage 1: the VAE (``RUN/vae``), and the decoder-only stage that keeps its latent space (``RUN/vae-decoder``)."""

from __future__ import annotations

from pathlib import Path

import torch
from harness_plugins.pretrain.architecture import build_vae

from harness import (
    Trainer,
)


class VaeTrainer(Trainer):
    """Stage 1: the AutoencoderKL alone, on random crops of the training images."""

    name = "pretrain-vae"
    weights_folder = "checkpoints"

    def setup(self) -> torch.nn.Module:
        self.resolution = self.resolution or 64
        self.crop = self.config.vae_crop
        return build_vae(self.config, self.resolution).to(self.device)

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        pixels = batch["pixel_values"]
        crop = min(self.crop, pixels.shape[-1])
        top, left = (int(v) for v in torch.randint(0, pixels.shape[-1] - crop + 1, (2,), generator=generator,
                                                    device=generator.device))
        pixels = pixels[..., top:top + crop, left:left + crop]
        posterior = self.model.encode(pixels).latent_dist
        reconstruction = self.model.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / pixels[0].numel()
        error = reconstruction.float() - pixels.float()
        return error.abs().mean() + error.pow(2).mean() + self.config.vae_kl_weight * kl

    def save_weights(self, folder: Path) -> None:
        self.unwrapped_model.save_pretrained(folder, safe_serialization=True)


class VaeDecoderTrainer(VaeTrainer):
    """Stage 1b: the decoder alone, the encoder frozen - so the latent space the UNet learns stays put.

    The first stage's decoder mixes up the closest colours (purple and blue, orange and yellow) on a
    few percent of pictures; a longer decoder-only stage fixes that for a fraction of the cost of a longer
    first stage (SD's ft-MSE VAE decoder is made the same way).
    """

    name = "pretrain-vae-decoder"

    def __init__(self, config, vae_folder: Path, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.vae_folder = vae_folder

    def setup(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(self.vae_folder, use_safetensors=True).to(self.device)
        self.resolution = self.resolution or vae.config.sample_size
        self.crop = self.config.vae_crop
        for name, parameter in vae.named_parameters():
            parameter.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
        return vae


