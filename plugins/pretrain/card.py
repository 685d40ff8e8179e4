"""The model card (README.md) of a pretrained model folder: architecture, data, recipe, losses, and the
judge's and caption reliance's figures as training went."""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness_plugins.pretrain.architecture import attending_blocks
from harness_plugins.pretrain.config import FIDELITY_LOG, PretrainConfig

import harness
from harness.lab import judge
from harness.lab.reliance import ATTRIBUTES

if TYPE_CHECKING:
    from harness_plugins.pretrain import PretrainTrainer


def model_card(trainer: PretrainTrainer) -> str:
    """README.md of the model folder: architecture, data, recipe, losses and held-out fidelity so far."""
    config, pipe = trainer.config, trainer.pipe
    sizes = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("vae", "unet", "text_encoder")
    }
    log = harness.TrainingRun(trainer.run_dir).log()
    fidelity = harness.json_objects(trainer.run_dir / FIDELITY_LOG)
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
        f"scaling factor {pipe.vae.config.scaling_factor}; {vae_recipe(config)} |",
        f"| UNet | {sizes['unet']:.2f} | widths {list(pipe.unet.config.block_out_channels)}, cross-attention in "
        f"{attending_blocks(pipe.unet.config.down_block_types)}, {config.prediction_type}, "
        f"zero terminal SNR: {config.zero_terminal_snr} |",
        f"| CLIP text encoder | {sizes['text_encoder']:.2f} | width {pipe.text_encoder.config.hidden_size}, "
        f"{pipe.text_encoder.config.num_hidden_layers} layers, trained with the UNet |",
        "",
        f"Data: {trainer._data_size} captioned images from {config.data_dir or config.dataset_name}. "
        f"UNet stage: batch {config.batch_size} x "
        f"{config.gradient_accumulation_steps}, AdamW {config.learning_rate:g} ({config.lr_scheduler}, "
        f"{config.lr_warmup_steps} warmup steps), caption dropout {config.caption_dropout:g}, seed {trainer.seed}"
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
            f"word for an attribute is swapped for another ({trainer.config.reliance_examples} training images per "
            "attribute, timesteps spread over the schedule); 0% means the model ignores the word:",
            "",
            "| step | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        lines += [f"| {row['step']} | " + " | ".join(f"{row['reliance'][n]:.1%}" if n in row["reliance"] else ""
                                                  for n in names) + " |" for row in relied]
    return "\n".join(lines) + "\n"

def vae_recipe(config: PretrainConfig) -> str:
    """How the VAE was made, in a phrase of the card's table."""
    if config.vae_path is not None:
        return f"from {config.vae_path}"
    first = (f"that of {config.init_from}" if config.init_from is not None
             else f"{config.vae_steps} steps on {config.vae_crop}px crops")
    if not config.vae_decoder_steps:
        return first
    return (f"{first}, then {config.vae_decoder_steps} decoder-only steps on batches of "
            f"{config.vae_batch_size or config.batch_size} {config.vae_crop}px crops")
