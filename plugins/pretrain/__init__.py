"""pretrain: a tiny Stable-Diffusion-architecture text-to-image model trained from scratch.

Two stages, each a run of the shared trainer machinery (accelerate, resumable checkpoints, logs):

1. ``RUN/vae``: an AutoencoderKL learns to reconstruct the images (random crops, L1 + MSE, a small KL
   term); ``--vae_path`` skips it with a VAE trained before.
2. ``RUN``: with the VAE frozen (its latents cached once), a UNet2DConditionModel and a CLIPTextModel over
   the offline tokenizer of ``harness.models.embedded`` learn to denoise together.

``final/`` is a plain diffusers folder that ``StableDiffusionPipeline.from_pretrained`` loads.
``--init_from`` trains such a folder on: its decoder alone (the latent space stays), then its UNet and text
encoder; ``--ema_decay`` saves and judges an exponential moving average of the UNet stage's weights.

What the UNet stage does, and why (measured on the shapes data; ``../shared/NOTES.md`` and the model
card have the figures):

- Zero-terminal-SNR betas with v-prediction (Lin et al., 2024, "Common Diffusion Noise Schedules and
  Sample Steps are Flawed"). SD's schedule leaves sqrt(alpha_bar) = 0.068 of the image at t=999: the model
  learns to read the background colour and the layout from that leftover signal, which pure noise at
  sampling time does not have. The pipeline samples with DDIM over trailing timesteps, as the paper asks.
- No min-SNR weighting: for v-prediction it weighs the noisiest timesteps by SNR/(SNR+1), close to zero
  near t=999 - exactly where the layout (where the shape goes) is decided.
- Caption dropout (``--caption_dropout``) so that classifier-free guidance has an unconditional model.
- ``fidelity.jsonl``: the prompt-fidelity judge on the held-out prompts every ``--eval_every`` steps,
  attribute by attribute, so a recipe change shows what it moved, and the caption reliance of
  ``harness.lab.reliance`` (how much the loss rises when a caption's word is wrong): whether the model
  reads each word at all, which the judge's samples cannot tell early on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import torch
from harness_plugins.pretrain import card, evaluation
from harness_plugins.pretrain.architecture import (
    TextToImage,
    build_text_encoder,
    build_unet,
    denoising_losses,
)
from harness_plugins.pretrain.config import (
    MODEL_CARD,
    VAE_DECODER_RUN,
    VAE_RUN,
    PretrainConfig,
    scheduler_config,
    training_timesteps,
)
from harness_plugins.pretrain.vae import VaeDecoderTrainer, VaeTrainer

import harness
from harness import (
    FINAL,
    HarnessError,
    LatentDiffusionTrainer,
    NoiseSchedule,
    StepReport,
    Trainer,
    one_line,
)
from harness.lab import scenes


class PretrainTrainer(LatentDiffusionTrainer):
    name = "pretrain"
    description = ("A tiny SD-architecture model from scratch: AutoencoderKL, then UNet + CLIP text encoder "
                   "(zero-terminal-SNR v-prediction); writes a diffusers pipeline folder.")
    config_class = PretrainConfig
    weights_folder = "model"

    def train(self) -> Path:
        self._ema = harness.EMA(self.config.ema_decay, warmup=True)
        self._reliance_examples: dict[str, list[tuple[int, str]]] | None = None
        config = self.config
        vae_config = replace(config, run_name=f"{config.run_name}/{VAE_RUN}", max_steps=config.vae_steps,
                             learning_rate=config.vae_learning_rate, lr_scheduler="constant", lr_warmup_steps=0,
                             batch_size=config.vae_batch_size or config.batch_size, validation_prompts=())
        if config.vae_path is not None:
            self.vae_folder = Path(config.vae_path).expanduser()
        elif config.init_from is not None:
            self.vae_folder = Path(config.init_from).expanduser() / "vae"
        else:
            self.vae_folder = self._stage(VaeTrainer(vae_config, self.plugin_manager, self.on_step, self.notify),
                                          "1 of 2: the VAE")
        # The decoder-only stage keeps the latent space, so it may also go on from the VAE of --init_from.
        if config.vae_path is None and config.vae_decoder_steps:
            decoder_config = replace(vae_config, run_name=f"{config.run_name}/{VAE_DECODER_RUN}",
                                     max_steps=config.vae_decoder_steps)
            decoder_trainer = VaeDecoderTrainer(decoder_config, self.vae_folder, self.plugin_manager,
                                                self.on_step, self.notify)
            self.vae_folder = self._stage(decoder_trainer, "1b of 2: the VAE's decoder")
        self.notify(f"stage 2 of 2: UNet + text encoder ({self.config.max_steps} steps) in '{self.run_dir}'")
        return super().train()

    def _stage(self, trainer: Trainer, title: str) -> Path:
        """Run an earlier stage unless its final/ folder is there already; return that folder."""
        final = trainer.checkpoint_dir / FINAL
        if not final.is_dir():
            self.notify(f"stage {title} ({trainer.config.max_steps} steps) in '{trainer.run_dir}'")
            trainer.train()
        return final

    def setup(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

        try:
            vae = AutoencoderKL.from_pretrained(self.vae_folder, use_safetensors=True)
        except (OSError, ValueError) as error:
            raise HarnessError(f"cannot load the VAE from '{self.vae_folder}': {error}; pass --vae_path with "
                               "a folder a VAE stage wrote (RUN/vae/checkpoints/final).") from None
        vae.requires_grad_(False)
        tokenizer = harness.build_tokenizer()
        self.resolution = self.resolution or vae.config.sample_size
        latent_side = self.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        scheduler = DDIMScheduler.from_config(scheduler_config(self.config))
        if self.config.init_from is not None:
            unet, text_encoder = self._load_init_from()
        else:
            unet, text_encoder = build_unet(self.config, latent_side), build_text_encoder(self.config, tokenizer)
        self.pipe = StableDiffusionPipeline(
            vae=vae.to(self.device), text_encoder=text_encoder.to(self.device), tokenizer=tokenizer,
            unet=unet.to(self.device), scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = scheduler.config
        self.schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config, self.device)
        self.model_spec = None
        every = max(1, 64 // self.config.eval_prompts)
        self.eval_prompts = scenes.held_out_prompts()[::every][: self.config.eval_prompts]
        return TextToImage(self.pipe.unet, self.pipe.text_encoder)

    def _load_init_from(self):
        """The UNet and text encoder of --init_from (its noise schedule was checked with the settings)."""
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(self.config.init_from).expanduser()
        try:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
        except (OSError, ValueError) as error:
            raise HarnessError(f"cannot load a model from --init_from '{folder}' ({one_line(error)}); pass a folder "
                               "a pretrain run wrote (RUN/model/final).") from None
        return unet, text_encoder

    def prepare_data(self, dataset):
        self._data_size = len(dataset)
        if self.config.init_from is None:  # a model trained on keeps the scaling its UNet learned
            self._set_scaling_factor(dataset)
        self._dataset = super().prepare_data(dataset)
        return self._dataset

    def _trained_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((name, p) for name, p in self.unwrapped_model.named_parameters() if p.requires_grad)

    def after_optimizer_step(self) -> None:
        if self.config.ema_decay:
            self._ema.update(dict(self._trained_parameters()))

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self._ema.state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors and not self.config.ema_decay:
            return super().load_extra_state(tensors)  # refuses: this run would drop the average
        if tensors:
            self._ema.load(tensors, dict(self._trained_parameters()))
        return None

    def _averaged_weights(self) -> AbstractContextManager[None]:
        """The moving average in place of the trained weights while the block runs (nothing without one)."""
        return self._ema.swapped_into(dict(self._trained_parameters()))

    def _set_scaling_factor(self, dataset, samples: int = 512) -> None:
        """SD's recipe: scale latents to unit standard deviation, measured on the training images."""
        vae = self.pipe.vae
        vae.register_to_config(scaling_factor=1.0)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(min(samples, len(dataset)))), batch_size=64
        )
        with torch.no_grad():
            latents = torch.cat(
                [vae.encode(batch["pixel_values"].to(self.device)).latent_dist.mean for batch in loader]
            )
        vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))

    def resolved_settings(self) -> dict:
        return {
            "vae": str(self.vae_folder),
            "vae_scaling_factor": self.pipe.vae.config.scaling_factor,
            "prediction_type": self.schedule.prediction_type,
        }

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = self.latents(batch, generator)
        captions = list(batch["caption"])
        keep = torch.rand(len(captions), generator=generator, device=generator.device) >= self.config.caption_dropout
        captions = [text if kept else "" for text, kept in zip(captions, keep.tolist())]
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        timesteps = training_timesteps(self.config, self.schedule.alphas_cumprod.numel(), latents.shape[0],
                                       generator).to(latents.device)
        model = self.model
        return denoising_losses(model.unet, model.text_encoder, self.pipe.tokenizer, self.schedule, latents, captions,
                                timesteps, noise).mean()

    def benchmark_command(self, final: Path) -> str:
        return f"harness bench --sampler vanilla-sd --model {final} --metric fidelity"

    def save_weights(self, folder: Path) -> None:
        # Checkpoints resume from their own copy of the trained weights; the model folder is what users load.
        with self._averaged_weights():
            self.pipe.save_pretrained(folder, safe_serialization=True)
        (folder / MODEL_CARD).write_text(card.model_card(self), encoding="utf-8")

    def validation_rows(self, prompts: Sequence[str], seed: int):
        guidance, steps = self.config.eval_guidance, self.config.eval_steps
        with self._averaged_weights():
            return [(prompt, self.generate(prompt, self.pipe.scheduler, steps, guidance, [seed, seed + 1]))
                    for prompt in prompts]

    def on_step_end(self, report: StepReport) -> None:
        if report.step % self.config.eval_every == 0 or report.step == self.config.max_steps:
            evaluation.judge_step(self, report.step)



@harness.hookimpl
def register_trainers(register):
    register(PretrainTrainer)
