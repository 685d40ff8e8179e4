"""pickscore: a human-preference score of each picture for its prompt (Kirstain et al. 2023, "Pick-a-Pic").

PickScore is a CLIP-H fine-tuned on the Pick-a-Pic preferences; a picture's score is CLIP's logit scale times
the cosine of its image and prompt embeddings (about 18-23 for SD 1.5's pictures), as the model card computes
it. The record carries the mean, each picture's score and the model's name.

The weights load through transformers, in safetensors only (``--pickscore-model``, a hub id or a local folder;
the processor from ``--pickscore-processor``). Offline without them, the metric records one line naming what to
download and the run's other metrics still run. HPSv2 and ImageReward, the other preference scores the papers
report, ship their weights as pickled ``.pt`` checkpoints, which harness never unpickles; they are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness_plugins.clip_score import image_text_cosines, on_device

import harness
from harness import HarnessError, MetricInput, PerImageMetric, one_line, setting


class PickScore(PerImageMetric):
    name = "pickscore"
    description = "PickScore: Pick-a-Pic's preference model, logit scale x CLIP cosine of picture and prompt."

    @dataclass(frozen=True)
    class Options(harness.Options):
        pickscore_model: str = setting("yuvalkirstain/PickScore_v1", "PickScore model: a hub id or a local folder "
                                                                     "(CLIPModel in safetensors).")
        pickscore_processor: str = setting("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "The processor PickScore was "
                                                                                    "trained with (hub id or folder).")

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import CLIPModel, CLIPProcessor

            try:
                model = CLIPModel.from_pretrained(self.options.pickscore_model, use_safetensors=True).eval()
                processor = CLIPProcessor.from_pretrained(self.options.pickscore_processor)
            except Exception as error:  # noqa: BLE001 - any load failure becomes the one-line fix below
                raise HarnessError(
                    f"pickscore cannot load '{self.options.pickscore_model}' with the processor "
                    f"'{self.options.pickscore_processor}': {one_line(error).rstrip('.')}; pass --pickscore-model "
                    "and --pickscore-processor with local folders (save_pretrained, safetensors), or run once with "
                    "network.") from None
            self._loaded = (model, processor)
        return self._loaded

    def score_batch(self, batch: MetricInput) -> list[float]:
        model, processor = self._load()
        scale = model.logit_scale.exp().item()
        with on_device(model, self.config.device):
            return [scale * cosine for cosine in image_text_cosines(model, processor, batch, self.config.device)]

    def summarize(self, scores: list[float], prompts: list[str]) -> dict[str, Any]:
        return {"value": sum(scores) / len(scores), "per_image": scores, "model": self.options.pickscore_model}


@harness.hookimpl
def register_metrics(register):
    register(PickScore)
