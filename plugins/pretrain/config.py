"""pretrain's settings (:class:`PretrainConfig`), the noise schedule they give and the timesteps it trains on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import (
    HarnessError,
    TrainConfig,
    one_line,
    setting,
)

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


