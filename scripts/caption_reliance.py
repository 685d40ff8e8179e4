"""Print the caption reliance of saved models: how much the training loss rises when a caption's word is wrong.

    python scripts/caption_reliance.py DATA_DIR MODEL [MODEL ...] [--examples 64] [--seed 0]

DATA_DIR is a shapes data set (``harness data shapes``); each MODEL a diffusers folder (a pretrain run's
``model/final`` or ``model/checkpoint-N``, or ``harness/models/weights/tiny-sd``). One markdown row per model, the
same measure ``harness train --plugin pretrain`` logs at each evaluation (``harness.lab.reliance``):
reliance on count, shape, colour, size, position and background, over the first images that state each.
"""

from __future__ import annotations

import argparse
import sys

import torch
from harness_plugins.pretrain.architecture import denoising_losses

from harness import HarnessError, NoiseSchedule, centre_crop, find_examples, to_pixels
from harness.lab.reliance import ATTRIBUTES, caption_reliance, probe_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--examples", type=int, default=64, help="training images per attribute")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    try:
        examples = find_examples(None, args.data_dir)
    except HarnessError as error:
        sys.exit(f"Error: {error}")
    probed = probe_examples(examples.captions, args.examples, seed=args.seed)
    if not probed:
        sys.exit(f"Error: no caption of '{args.data_dir}' is a shapes caption; pass a `harness data shapes` folder.")
    print("| model | " + " | ".join(name for name in ATTRIBUTES if name in probed) + " |")
    print("|---" * (len(probed) + 1) + "|")
    for folder in args.models:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, use_safetensors=True)
        schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config, torch.device("cpu"))
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor

        def latents(indices, pipe=pipe, side=side):
            pixels = torch.stack([to_pixels(centre_crop(examples.read_image(index), side)) for index in indices])
            with torch.no_grad():
                return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor

        def loss(clean, captions, timesteps, noise, pipe=pipe, schedule=schedule):
            return denoising_losses(pipe.unet, pipe.text_encoder, pipe.tokenizer, schedule, clean, captions,
                                    timesteps, noise)

        reliance = caption_reliance(loss, latents, examples.captions, probed, schedule.alphas_cumprod.numel(),
                                    args.seed)
        print(f"| {folder} | " + " | ".join(f"{reliance[name]:.1%}" for name in ATTRIBUTES if name in probed) + " |")


if __name__ == "__main__":
    main()
