"""Latent-diffusion plumbing for trainers of Stable-Diffusion-architecture models.

- :class:`NoiseSchedule`: the forward process and the conversions between what a UNet predicts (epsilon,
  v or the sample) and the clean latent, built from the model's own scheduler config, so any betas
  (zero-terminal-SNR included) and prediction type work.
- :class:`LatentDiffusionTrainer`: loads the pipeline with ``harness.models.loading`` (the code ``harness bench``
  uses), freezes it, encodes images and captions, optionally caches the VAE's posteriors, and samples
  images for validation grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from harness.models import loading as models
from harness.training.trainer import Trainer

if TYPE_CHECKING:
    # The defining module, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

#: The end of every solver path: the clean latent (alpha 1, sigma 0), "timestep -1".
CLEAN = -1
#: sigma_data of the consistency-model boundary scalings.
SIGMA_DATA = 0.5


class NoiseSchedule:
    """x_t = alpha_t * x_0 + sigma_t * noise, with alpha_t^2 = alphas_cumprod[t] and sigma_t^2 = 1 - alpha_t^2."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler_config(cls, config, device: torch.device) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        # DDPMScheduler computes alphas_cumprod from every beta option (schedules, trained_betas, zero SNR).
        scheduler = DDPMScheduler.from_config(config)
        return cls(scheduler.alphas_cumprod.to(device), scheduler.config.prediction_type)

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t shaped to broadcast against ``like`` (B, C, H, W); t may be CLEAN."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).expand(like.shape[0])
        alpha_bar = torch.where(t < 0, torch.ones_like(t, dtype=torch.float32),
                                self.alphas_cumprod[t.clamp(min=0)])
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t, clean)
        return alpha * clean + sigma * noise

    def to_clean(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The clean latent a model output implies."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * output
        return output

    def to_noise(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The noise a model output implies."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            return sigma * x_t + alpha * output
        return (x_t - alpha * output) / sigma

    def consistency(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    timestep_scaling: float) -> torch.Tensor:
        """f(x, t) = c_skip x + c_out x0 of consistency models (Song et al., 2023), sigma_data 0.5, with t scaled
        by ``timestep_scaling``: the identity at t = 0, the model's clean latent at large t."""
        scaled = (t.float() * timestep_scaling).view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip * x_t + c_out * self.to_clean(output, x_t, t)

    def ddim_step(self, output: torch.Tensor, x_t: torch.Tensor, t, t_next) -> torch.Tensor:
        """One deterministic DDIM step (Song et al., 2021) from t to t_next (CLEAN: to the clean latent)."""
        alpha_next, sigma_next = self.alpha_sigma(t_next, x_t)
        return alpha_next * self.to_clean(output, x_t, t) + sigma_next * self.to_noise(output, x_t, t)


class EncodedDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Items ``{"latent_params": VAE posterior mean and log-variance, "caption": str}``."""

    def __init__(self, latent_params: torch.Tensor, captions: Sequence[str]):
        self.latent_params, self.captions = latent_params, list(captions)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latent_params": self.latent_params[index], "caption": self.captions[index]}


class LatentDiffusionTrainer(Trainer):
    """A trainer of an SD-architecture pipeline (VAE + CLIP text encoder + UNet2DConditionModel)."""

    def load_pipeline(self) -> StableDiffusionPipeline:
        """Load the --model pipeline frozen on this process's device; set the resolution and schedule."""
        spec = models.resolve_model(self.config.model or models.default_model_name(self.device))
        if spec.notice:
            self.notify(spec.notice)
        pipe = models.load_pipeline(spec, self.device, self.weight_dtype)
        for module in (pipe.vae, pipe.text_encoder, pipe.unet):
            module.requires_grad_(False)
        if self.config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self.model_spec, self.pipe = spec, pipe
        self.scheduler_config = pipe.scheduler.config
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config, self.device)
        if self.resolution is None:
            # The model's native size: 64 latents x 8 = 512 for SD 1.5, 16 x 4 = 64 for the embedded model.
            self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return pipe

    def resolved_settings(self) -> dict[str, Any]:
        return {"model": self.model_spec.name, "model_location": self.model_spec.location,
                "prediction_type": self.schedule.prediction_type}

    def prepare_data(self, dataset):
        """With --cache_latents: encode every image once; training then samples from the stored posteriors."""
        if not self.config.cache_latents:
            return dataset
        self.notify(f"encoding {len(dataset)} image(s) with the VAE (--cache_latents)")
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.config.batch_size)
        params, captions = [], []
        with torch.no_grad():
            for batch in loader:
                pixels = batch["pixel_values"].to(self.device, self.weight_dtype)
                params.append(self.pipe.vae.encode(pixels).latent_dist.parameters.float().cpu())
                captions += batch["caption"]
        return EncodedDataset(torch.cat(params), captions)

    def latents(self, batch: dict[str, Any], generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents of the batch's images, drawn from the VAE posterior (cached or encoded now); without a
        generator, the posterior's mean."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if "latent_params" in batch:
            posterior = DiagonalGaussianDistribution(batch["latent_params"])
        else:
            with torch.no_grad():
                posterior = self.pipe.vae.encode(batch["pixel_values"].to(self.weight_dtype)).latent_dist
        drawn = posterior.mean if generator is None else posterior.sample(generator)
        return drawn.float() * self.pipe.vae.config.scaling_factor

    def encode_prompts(self, captions: Sequence[str]) -> torch.Tensor:
        """Text-encoder states for each caption, exactly as the pipeline computes them at inference."""
        with torch.no_grad():
            embeddings, _ = self.pipe.encode_prompt(list(captions), self.device, 1, do_classifier_free_guidance=False)
        return embeddings

    def generate(self, prompt: str | Sequence[str], scheduler, steps: int, guidance_scale: float,
                 seeds: Sequence[int]) -> list[Image.Image]:
        """Images of the model as it is now (adapters included) with ``scheduler``, one per seed.

        One prompt: an image of it per seed. A list of prompts: prompt i drawn with seeds[i], in one batch.

        CPU generators, as harness's samplers use, so the starting noise matches ``harness bench``.
        """
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**{**self.pipe.components, "scheduler": scheduler},
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        model = self.unwrapped_model
        was_training = model.training
        model.eval()  # no dropout in the pictures, whatever the LoRA's config
        try:
            with self.accelerator.autocast():
                one_prompt = isinstance(prompt, str)
                return pipe(prompt=prompt if one_prompt else list(prompt), num_inference_steps=steps,
                            guidance_scale=guidance_scale, num_images_per_prompt=len(seeds) if one_prompt else 1,
                            generator=models.cpu_generators(seeds),
                            height=self.resolution, width=self.resolution).images
        finally:
            model.train(was_training)
