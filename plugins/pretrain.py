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

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

import harness
from harness import (
    FINAL,
    EncodedDataset,
    HarnessError,
    LatentDiffusionTrainer,
    NoiseSchedule,
    StepReport,
    TrainConfig,
    Trainer,
    one_line,
    setting,
)
from harness.lab import judge, scenes
from harness.lab.reliance import ATTRIBUTES, caption_reliance, probe_examples

FIDELITY_LOG = "fidelity.jsonl"
VAE_RUN = "vae"
VAE_DECODER_RUN = "vae-decoder"
MODEL_CARD = "README.md"


@dataclass
class PretrainConfig(TrainConfig):
    """Settings of both stages. The shared ones (batch size, learning rate, ...) are the UNet stage's."""

    run_name: str = setting("embedded", "Folder name of this run inside --output_dir.")
    max_steps: int = setting(6000, "UNet optimizer steps.", minimum=1)
    batch_size: int = setting(32, "Images per device per micro-batch (both stages unless --vae_batch_size).",
                              minimum=1)
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", aliases=("grad_accum",),
                                               minimum=1)
    learning_rate: float = setting(1e-3, "AdamW learning rate of the UNet stage.", minimum=0)
    lr_scheduler: str = setting("cosine", "Learning-rate schedule of the UNet stage (diffusers.optimization).",
                                choices=TrainConfig.__dataclass_fields__["lr_scheduler"].metadata["choices"])
    lr_warmup_steps: int = setting(200, "Steps of linear warmup (UNet stage).", minimum=0)
    cache_latents: bool = setting(True, "Encode every image with the trained VAE once, before the UNet stage.")
    checkpointing_steps: int = setting(500, "Save a resumable checkpoint every N steps (both stages).", minimum=1)
    checkpoints_total_limit: int | None = setting(2, "Keep only the newest N checkpoints.", minimum=1)

    vae_path: str | None = setting(None, "A trained AutoencoderKL folder: skip the VAE stage.")
    init_from: str | None = setting(None, "A model folder a pretrain run wrote (RUN/model/final): train its UNet and "
                                          "text encoder on, with its VAE and scaling factor, instead of from scratch.")
    ema_decay: float = setting(0.0, "Decay of an exponential moving average of the UNet and text encoder weights "
                                    "(e.g. 0.999); the saved model and the judge use the average. 0: none.", minimum=0)
    vae_steps: int = setting(2000, "VAE optimizer steps.", minimum=1)
    vae_decoder_steps: int = setting(1000, "Steps of the decoder-only VAE stage (0: none); with --init_from it "
                                           "trains that model's decoder on.", minimum=0)
    vae_learning_rate: float = setting(1e-3, "AdamW learning rate of the VAE stage.", minimum=0)
    vae_batch_size: int | None = setting(None, "Crops per device per micro-batch of the VAE stages (default: "
                                               "--batch_size).", minimum=1)
    vae_crop: int = setting(32, "Side of the random crops the VAE trains on (a multiple of 8).", minimum=8)
    vae_kl_weight: float = setting(1e-6, "Weight of the VAE's KL term.", minimum=0)
    vae_channels: tuple[int, ...] = setting((32, 64, 64), "VAE block widths; each block after the first halves "
                                                           "the resolution.", minimum=8)
    unet_channels: tuple[int, ...] = setting((64, 128, 128, 128), "UNet block widths; each block after the first "
                                                              "halves the resolution.", minimum=8)
    unet_blocks_without_attention: int = setting(1, "UNet blocks, from the highest resolution, without cross-attention "
                                                    "(0: every block attends to the caption).", minimum=0)
    unet_layers_per_block: int = setting(1, "ResNet layers per UNet block.", minimum=1)
    text_width: int = setting(64, "Hidden size of the CLIP text encoder (and the UNet's cross-attention).",
                              minimum=8)
    text_layers: int = setting(2, "Transformer layers of the CLIP text encoder.", minimum=1)
    prediction_type: str = setting("v_prediction", "What the UNet predicts.", choices=("v_prediction", "epsilon"))
    zero_terminal_snr: bool = setting(True, "Rescale SD's betas to zero terminal SNR (pure noise at t=999).")
    caption_dropout: float = setting(0.1, "Fraction of captions replaced by the empty prompt.", minimum=0)
    timestep_sampling: str = setting("uniform", "How UNet-stage timesteps are drawn: uniform, or logit_normal "
                                                "(SD3's: t/1000 = sigmoid of a normal; more draws mid-schedule).",
                                     choices=("uniform", "logit_normal"))
    logit_mean: float = setting(0.0, "Mean of that normal (logit_normal only; SD3's default 0).")
    logit_std: float = setting(1.0, "Its standard deviation (logit_normal only; SD3's default 1).", minimum=0)
    eval_every: int = setting(500, "Judge the held-out prompts every N UNet steps (and at the end).", minimum=1)
    eval_prompts: int = setting(64, "How many of the 64 held-out prompts to judge.", minimum=1)
    eval_steps: int = setting(30, "Sampling steps of that evaluation.", minimum=1)
    eval_guidance: float = setting(7.5, "Guidance scale of that evaluation.", minimum=0)
    reliance_examples: int = setting(64, "Training images per caption attribute of the caption-reliance probe at "
                                         "each evaluation (0: none).", minimum=0)

    def check(self) -> None:
        super().check()
        if self.vae_crop % 8:
            raise HarnessError(f"--vae_crop {self.vae_crop} is not a multiple of 8; pick e.g. 32.")
        if not 0 <= self.caption_dropout < 1:
            raise HarnessError(f"--caption_dropout {self.caption_dropout} must be in [0, 1); e.g. 0.1.")
        if len(self.vae_channels) < 2 or len(self.unet_channels) < 2:
            raise HarnessError("--vae_channels and --unet_channels need at least two widths, e.g. 64 128 128.")
        if self.unet_blocks_without_attention >= len(self.unet_channels):
            raise HarnessError(f"--unet_blocks_without_attention {self.unet_blocks_without_attention} leaves no block "
                               f"of the {len(self.unet_channels)} in --unet_channels attending to the caption; pick "
                               f"at most {len(self.unet_channels) - 1}.")
        if self.ema_decay >= 1:
            raise HarnessError(f"--ema_decay {self.ema_decay:g} must be below 1 (an average that never moves); "
                               "e.g. 0.999, or 0 for none.")
        if self.init_from is not None and self.vae_path is not None:
            raise HarnessError("--init_from brings its own VAE; drop --vae_path.")
        if self.init_from is not None:
            missing = [part for part in ("vae", "unet", "text_encoder", "scheduler")
                       if not (Path(self.init_from).expanduser() / part).is_dir()]
            if missing:
                raise HarnessError(f"--init_from '{self.init_from}' is not a model folder (no {missing[0]}/ in it); "
                                   "pass one a pretrain run wrote, e.g. RUN/model/final.")
            self._check_init_schedule()

    def _check_init_schedule(self) -> None:
        """Refuse, before any stage runs, a model trained with another noise schedule than this run's."""
        path = Path(self.init_from).expanduser() / "scheduler" / "scheduler_config.json"
        try:
            trained_with = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise HarnessError(f"cannot read '{path}' ({one_line(error)}); pass a model folder a pretrain run "
                               "wrote, e.g. RUN/model/final.") from None
        wanted = scheduler_config(self)
        options = (("prediction_type", "--prediction_type"), ("rescale_betas_zero_snr", "--zero_terminal_snr"))
        for key, option in options:
            if trained_with.get(key) != wanted[key]:
                raise HarnessError(f"--init_from '{self.init_from}' was trained with {key} {trained_with.get(key)}, "
                                   f"this run has {wanted[key]}; set {option} to match it.")


def scheduler_config(config: PretrainConfig) -> dict:
    """SD 1.5's betas, rescaled to zero terminal SNR if asked, sampled with DDIM over trailing timesteps."""
    return {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "rescale_betas_zero_snr": config.zero_terminal_snr, "prediction_type": config.prediction_type,
        "timestep_spacing": "trailing" if config.zero_terminal_snr else "leading", "steps_offset": 1,
        "clip_sample": False, "set_alpha_to_one": False,
    }


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


def _attending_blocks(down_block_types: Sequence[str]) -> str:
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


class _TextToImage(torch.nn.Module):
    """The UNet and the text encoder as one trained module, for accelerate and the checkpoints."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


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
        return _TextToImage(self.pipe.unet, self.pipe.text_encoder)

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
        (folder / MODEL_CARD).write_text(self.model_card(), encoding="utf-8")

    def model_card(self) -> str:
        """README.md of the model folder: architecture, data, recipe, losses and held-out fidelity so far."""
        config, pipe = self.config, self.pipe
        sizes = {
            name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
            for name in ("vae", "unet", "text_encoder")
        }
        log = harness.TrainingRun(self.run_dir).log()
        fidelity = harness.json_objects(self.run_dir / FIDELITY_LOG)
        lines = [
            "# harness embedded model: a tiny Stable Diffusion trained from scratch",
            "",
            "Stable Diffusion 1.5's architecture at a tiny size (64x64 images, "
            f"{pipe.unet.config.sample_size}x{pipe.unet.config.sample_size}x4 latents), trained by "
            "`harness train --plugin pretrain` on the synthetic shapes captions of `harness data shapes` "
            '("two blue squares on a white background", "a large shape at the top"). It loads with '
            "`StableDiffusionPipeline.from_pretrained` and draws what such captions say; anything else "
            "it draws badly.",
            "",
            "| part | parameters (M) | |",
            "|---|---|---|",
            f"| VAE | {sizes['vae']:.2f} | widths {list(pipe.vae.config.block_out_channels)}, "
            f"scaling factor {pipe.vae.config.scaling_factor}; {self._vae_recipe()} |",
            f"| UNet | {sizes['unet']:.2f} | widths {list(pipe.unet.config.block_out_channels)}, cross-attention in "
            f"{_attending_blocks(pipe.unet.config.down_block_types)}, {config.prediction_type}, "
            f"zero terminal SNR: {config.zero_terminal_snr} |",
            f"| CLIP text encoder | {sizes['text_encoder']:.2f} | width {pipe.text_encoder.config.hidden_size}, "
            f"{pipe.text_encoder.config.num_hidden_layers} layers, trained with the UNet |",
            "",
            f"Data: {self._data_size} captioned images from {config.data_dir or config.dataset_name}. "
            f"UNet stage: batch {config.batch_size} x "
            f"{config.gradient_accumulation_steps}, AdamW {config.learning_rate:g} ({config.lr_scheduler}, "
            f"{config.lr_warmup_steps} warmup steps), caption dropout {config.caption_dropout:g}, seed {self.seed}"
            + (f", timesteps logit-normal ({config.logit_mean:g}, {config.logit_std:g})"
               if config.timestep_sampling == "logit_normal" else "")
            + (f", weights averaged (EMA decay {config.ema_decay:g})" if config.ema_decay else "") + ".",
        ]
        if config.init_from is not None:
            lines.append(f"The UNet and text encoder were trained on from those of {config.init_from}; the steps "
                         "below are this run's.")
        if log:
            last = log[-1]
            lines.append(
                f"Trained {last['step']} steps in {last['seconds'] / 60:.1f} min; final loss "
                f"{sum(item['loss'] for item in log[-50:]) / len(log[-50:]):.4f} (mean of the last 50 steps)."
            )
        if fidelity:
            names = [name for name in judge.SUMMARY_KEYS if name != "overall"]
            lines += [
                "",
                f"Judge log: prompt fidelity on the held-out prompts ({fidelity[-1]['n']} prompts, "
                f"{fidelity[-1]['sampler']}, `harness.lab.judge`), as training went:",
                "",
                "| step | overall | " + " | ".join(names) + " |",
                "|---" * (len(names) + 2) + "|",
            ]
            lines += [
                f"| {row['step']} | {row['overall']:.3f} | "
                + " | ".join(f"{row[n]:.2f}" if n in row else "" for n in names) + " |"
                for row in fidelity
            ]
        relied = [row for row in fidelity if "reliance" in row]
        if relied:
            names = [name for name in ATTRIBUTES if name in relied[-1]["reliance"]]
            lines += [
                "",
                "Caption reliance (`harness.lab.reliance`): how much the training loss rises when the caption's "
                f"word for an attribute is swapped for another ({self.config.reliance_examples} training images per "
                "attribute, timesteps spread over the schedule); 0% means the model ignores the word:",
                "",
                "| step | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            lines += [f"| {row['step']} | " + " | ".join(f"{row['reliance'][n]:.1%}" if n in row["reliance"] else ""
                                                      for n in names) + " |" for row in relied]
        return "\n".join(lines) + "\n"

    def _vae_recipe(self) -> str:
        config = self.config
        if config.vae_path is not None:
            return f"from {config.vae_path}"
        first = (f"that of {config.init_from}" if config.init_from is not None
                 else f"{config.vae_steps} steps on {config.vae_crop}px crops")
        if not config.vae_decoder_steps:
            return first
        return (f"{first}, then {config.vae_decoder_steps} decoder-only steps on batches of "
                f"{config.vae_batch_size or config.batch_size} {config.vae_crop}px crops")

    def validation_rows(self, prompts: Sequence[str], seed: int):
        guidance, steps = self.config.eval_guidance, self.config.eval_steps
        with self._averaged_weights():
            return [(prompt, self.generate(prompt, self.pipe.scheduler, steps, guidance, [seed, seed + 1]))
                    for prompt in prompts]

    def on_step_end(self, report: StepReport) -> None:
        if report.step % self.config.eval_every == 0 or report.step == self.config.max_steps:
            self._judge(report.step)

    def _judge(self, step: int) -> None:
        """Append the judge's scores on the held-out prompts to fidelity.jsonl (on the main process, where
        on_step_end runs)."""
        prompts = self.eval_prompts
        images = []
        with self._averaged_weights():
            for start in range(0, len(prompts), 16):
                chunk = prompts[start : start + 16]
                images += self.generate(chunk, self.pipe.scheduler, self.config.eval_steps, self.config.eval_guidance,
                                        range(start, start + len(chunk)))
        scores = judge.judge_all(zip(images, prompts))
        line = {
            "step": step,
            "sampler": f"ddim-{self.config.eval_steps}-cfg{self.config.eval_guidance}",
            **{name: round(value, 4) for name, value in scores.items()},
        }
        reliance = self._caption_reliance()
        if reliance:
            line["reliance"] = {name: round(value, 4) + 0.0 for name, value in reliance.items()}  # no -0.0
            self.log_metrics({f"reliance/{name}": value for name, value in reliance.items()}, step)
        with open(self.run_dir / FIDELITY_LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
        self.log_metrics({f"fidelity/{name}": value for name, value in scores.items() if name != "n"}, step)
        self.notify(
            f"step {step}: held-out fidelity {scores['overall']:.3f} "
            + " ".join(f"{name} {value:.2f}" for name, value in scores.items() if name not in ("overall", "n"))
            + ("; caption reliance " + " ".join(f"{name} {value:.1%}" for name, value in reliance.items())
               if reliance else "")
        )

    def _caption_reliance(self) -> dict[str, float]:
        """``harness.lab.reliance`` on the first training images that state each attribute (the same ones,
        timesteps and noise at every evaluation, so the rows compare); empty for data without shapes captions."""
        if not self.config.reliance_examples:
            return {}
        dataset = self._dataset
        captions = dataset.captions if isinstance(dataset, EncodedDataset) else dataset.examples.captions
        if self._reliance_examples is None:
            self._reliance_examples = probe_examples(captions, self.config.reliance_examples, seed=self.seed)
        if not self._reliance_examples:
            return {}

        def latents(indices: Sequence[int]) -> torch.Tensor:
            batch = torch.utils.data.default_collate([dataset[index] for index in indices])
            batch = {key: value.to(self.device) if isinstance(value, torch.Tensor) else value
                     for key, value in batch.items()}
            return self.latents(batch, generator=None)

        model = self.unwrapped_model
        was_training = model.training
        model.eval()
        try:
            with self._averaged_weights():
                loss = partial(denoising_losses, model.unet, model.text_encoder, self.pipe.tokenizer, self.schedule)
                return caption_reliance(loss, latents, captions,
                                        self._reliance_examples, self.schedule.alphas_cumprod.numel(), self.seed)
        finally:
            model.train(was_training)


def training_timesteps(config: PretrainConfig, num_timesteps: int, count: int,
                       generator: torch.Generator) -> torch.Tensor:
    """``count`` training timesteps: uniform over the schedule, or logit-normal as SD3 draws them (Esser et al.
    2024, section 3.1: t/T = sigmoid(u), u ~ N(logit_mean, logit_std)), which trains the middle of the schedule,
    where a picture's shapes are settled, more often than its ends."""
    if config.timestep_sampling == "uniform":
        return torch.randint(0, num_timesteps, (count,), generator=generator, device=generator.device)
    normal = torch.randn(count, generator=generator, device=generator.device)
    fraction = torch.sigmoid(config.logit_mean + config.logit_std * normal)
    return (fraction * num_timesteps).long().clamp(max=num_timesteps - 1)


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


@harness.hookimpl
def register_trainers(register):
    register(PretrainTrainer)
