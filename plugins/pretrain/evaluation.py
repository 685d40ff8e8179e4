"""pretrain's own evaluation every ``--eval_every`` steps: the prompt-fidelity judge on the held-out prompts
and the caption reliance of ``harness.lab.reliance``, appended to fidelity.jsonl and sent to the trackers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from harness_plugins.pretrain.architecture import denoising_losses
from harness_plugins.pretrain.config import FIDELITY_LOG

from harness import EncodedDataset
from harness.lab import judge
from harness.lab.reliance import caption_reliance, probe_examples

if TYPE_CHECKING:
    from harness_plugins.pretrain import PretrainTrainer


def judge_step(trainer: PretrainTrainer, step: int) -> None:
    """Append the judge's scores on the held-out prompts to fidelity.jsonl (on the main process, where
    on_step_end runs)."""
    prompts = trainer.eval_prompts
    images = []
    with trainer._averaged_weights():
        for start in range(0, len(prompts), 16):
            chunk = prompts[start : start + 16]
            images += trainer.generate(chunk, trainer.pipe.scheduler, trainer.config.eval_steps,
                                       trainer.config.eval_guidance, range(start, start + len(chunk)))
    scores = judge.judge_all(zip(images, prompts))
    line = {
        "step": step,
        "sampler": f"ddim-{trainer.config.eval_steps}-cfg{trainer.config.eval_guidance}",
        **{name: round(value, 4) for name, value in scores.items()},
    }
    reliance = reliance_now(trainer)
    if reliance:
        line["reliance"] = {name: round(value, 4) + 0.0 for name, value in reliance.items()}  # no -0.0
        trainer.log_metrics({f"reliance/{name}": value for name, value in reliance.items()}, step)
    with open(trainer.run_dir / FIDELITY_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")
    trainer.log_metrics({f"fidelity/{name}": value for name, value in scores.items() if name != "n"}, step)
    trainer.notify(
        f"step {step}: held-out fidelity {scores['overall']:.3f} "
        + " ".join(f"{name} {value:.2f}" for name, value in scores.items() if name not in ("overall", "n"))
        + ("; caption reliance " + " ".join(f"{name} {value:.1%}" for name, value in reliance.items())
           if reliance else "")
    )

def reliance_now(trainer: PretrainTrainer) -> dict[str, float]:
    """``harness.lab.reliance`` on the first training images that state each attribute (the same ones,
    timesteps and noise at every evaluation, so the rows compare); empty for data without shapes captions."""
    if not trainer.config.reliance_examples:
        return {}
    dataset = trainer._dataset
    captions = dataset.captions if isinstance(dataset, EncodedDataset) else dataset.examples.captions
    if trainer._reliance_examples is None:
        trainer._reliance_examples = probe_examples(captions, trainer.config.reliance_examples, seed=trainer.seed)
    if not trainer._reliance_examples:
        return {}

    def latents(indices: Sequence[int]) -> torch.Tensor:
        batch = torch.utils.data.default_collate([dataset[index] for index in indices])
        batch = {key: value.to(trainer.device) if isinstance(value, torch.Tensor) else value
                 for key, value in batch.items()}
        return trainer.latents(batch, generator=None)

    model = trainer.unwrapped_model
    was_training = model.training
    model.eval()
    try:
        with trainer._averaged_weights():
            loss = partial(denoising_losses, model.unet, model.text_encoder, trainer.pipe.tokenizer, trainer.schedule)
            return caption_reliance(loss, latents, captions,
                                    trainer._reliance_examples, trainer.schedule.alphas_cumprod.numel(), trainer.seed)
    finally:
        model.train(was_training)
