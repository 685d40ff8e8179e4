"""clip-score: how well each image matches its prompt, by the cosine of CLIP's image and text embeddings.

Two scales circulate under the same name and are not comparable: torchmetrics (and most benchmark tables)
report 100 * max(cos, 0), the papers' "CLIP score" is the raw cosine in [0, 1]. The record carries both,
names which one ``value`` is, and names the CLIP model, since scores from different CLIPs differ too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import harness
from harness import HarnessError, MetricInput, PerImageMetric, one_line, setting

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
SCALE = "torchmetrics: 100 * max(cosine, 0)"
BATCH = 16  # images per CLIP forward pass: bounds memory for large prompt sets


class ClipScoreMetric(PerImageMetric):
    name = "clip-score"
    description = ("CLIP score: image-prompt cosine of a CLIP model's embeddings; value on the torchmetrics "
                   "0-100 scale, the raw 0-1 cosine recorded next to it.")

    @dataclass(frozen=True)
    class Options(harness.Options):
        clip_model: str = setting(DEFAULT_CLIP, "CLIP model for clip-score: a hub id or a local folder saved with "
                                                "save_pretrained (CLIPModel in safetensors and its CLIPProcessor).")

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.clip_model = self.options.clip_model
        self._loaded = None  # (model, processor), loaded at the first score call

    def score_batch(self, batch: MetricInput) -> list[float]:
        model, processor = self._load()
        with on_device(model, self.config.device):
            return image_text_cosines(model, processor, batch, self.config.device)

    def summarize(self, cosines: list[float], prompts: list[str]) -> dict:
        cosine = sum(cosines) / len(cosines)
        return {
            "value": 100 * max(cosine, 0.0),
            "cosine": cosine,
            "scale": SCALE,
            "clip_model": self.clip_model,
            "per_image_cosine": cosines,
        }

    def _load(self):
        if self._loaded is None:
            from transformers import CLIPModel, CLIPProcessor

            try:
                model = CLIPModel.from_pretrained(self.clip_model, use_safetensors=True)
                processor = CLIPProcessor.from_pretrained(self.clip_model)
            except Exception as error:  # noqa: BLE001 - any load failure becomes the one-line fix below
                raise HarnessError(self._load_failure(error)) from None
            self._loaded = (model.eval(), processor)
        return self._loaded

    def _load_failure(self, error: Exception) -> str:
        reason = one_line(error).rstrip(".")  # the sentence below adds its own full stop
        if Path(self.clip_model).is_dir():
            return (f"cannot load CLIP model from '{self.clip_model}': {reason}. Check that the folder holds a "
                    "CLIPModel in safetensors and its CLIPProcessor, both saved with save_pretrained.")
        return (f"cannot load CLIP model '{self.clip_model}': {reason}. To fix: pass --clip_model with a local "
                "folder (CLIPModel + CLIPProcessor saved with save_pretrained), or run `huggingface-cli login` "
                "and check the network.")


@contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """``model`` on ``device`` for the block, back on the CPU after it: on a GPU, a metric's weights would
    otherwise sit inside the sampler's peak-memory figures (clip-score, pickscore)."""
    model.to(device)
    try:
        yield model
    finally:
        if device.type == "cuda":
            model.to("cpu")
            torch.cuda.empty_cache()


def image_text_cosines(model, processor, data: MetricInput, device: torch.device) -> list[float]:
    """The cosine of each picture's and its prompt's CLIP embeddings, in batches of BATCH (clip-score, pickscore)."""
    # CLIP's text encoder has a fixed context (77 tokens): longer prompts are cut, as torchmetrics does.
    max_tokens = model.config.text_config.max_position_embeddings
    cosines: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(data.images), BATCH):
            images = [image.convert("RGB") for image in data.images[start:start + BATCH]]
            prompts = list(data.prompts[start:start + BATCH])
            inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True,
                               truncation=True, max_length=max_tokens).to(device)
            output = model(**inputs)
            # CLIPModel returns unit-length embeddings, so the row-wise dot product is the cosine.
            cosines += (output.image_embeds * output.text_embeds).sum(dim=-1).tolist()
    return cosines


@harness.hookimpl
def register_metrics(register):
    register(ClipScoreMetric)
