"""Set metrics of the field: fid, kid, fd-dinov2 and cmmd, each against the baseline's pictures.

A set metric compares the distribution of a measurement's pictures with a reference set's (here the first
baseline of the run, so ``--compare_baseline``: how far a student is from its teacher), not picture by
picture. Each records which features, which resize and which reference it used, since numbers from other
features or resizes are not comparable.

- ``fid`` (Heusel et al. 2017): Frechet distance of Inception-V3 pool features, the torchmetrics
  implementation with torch-fidelity's Inception weights (as pytorch-fid computes them); pictures resized
  to 299x299 by torch-fidelity's own bilinear resize, as clean-fid recommends (Parmar et al. 2022).
- ``kid`` (Binkowski et al. 2018): the unbiased polynomial-kernel MMD on the same features (torchmetrics),
  averaged over subsets of ``--kid_subset_size`` pictures.
- ``fd-dinov2`` (Stein et al. 2023): Frechet distance of DINOv2 ViT-L/14 CLS features (transformers,
  ``--dinov2_model``), pictures resized to 224x224 bicubic by its processor.
- ``cmmd`` (Jayasumana et al. 2024, "Rethinking FID"): MMD with a Gaussian RBF kernel (sigma 10, scaled by
  1000) on CLIP ViT-L/14@336 image embeddings (``--cmmd_clip_model``). ``--cmmd_estimator published`` (the
  default) is the estimator of the paper's released code, which averages the full kernel matrices;
  ``unbiased`` leaves out their diagonals, the unbiased estimator the paper's text describes.

Their weights come from the network on first use (torch-fidelity's release, the hub): offline without them,
a metric records one line naming what to download, and the run's other metrics still run. The lab's own
distribution metric, which needs no network, is ``fd-lab`` (``harness_plugins.lab_distance``).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import harness
from harness import HarnessError, Metric, MetricInput, one_line, setting

BATCH = 32
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


class Features(torch.nn.Module):
    """A metric's feature extractor as torchmetrics calls it: uint8 pictures (N, 3, H, W) in, (N, D) out."""

    def __init__(self, extract):
        super().__init__()
        self.extract = extract

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images).double()


def as_uint8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


class SetMetric(Metric):
    """A distance between the measurement's pictures and the baseline's, on features of ``extractor()``."""

    higher_is_better = False
    needs_reference = True
    features_name: str = ""
    resize: str = ""

    @abstractmethod
    def extractor(self):
        """A callable: uint8 pictures (N, 3, H, W) -> features (N, D); loads its weights on first use."""

    @abstractmethod
    def distance(self, extract, images, references) -> float:
        """The metric between the two sets of pictures."""

    def score(self, data: MetricInput) -> dict[str, Any]:
        assert data.references is not None  # needs_reference: the runner skips the metric without one
        if len(data.images) < 2 or len(data.references) < 2:
            raise HarnessError(f"{self.name} needs at least 2 images on each side; pass more prompts or "
                               "--num_images 2 or more.")
        value = self.distance(self.extractor(), list(data.images), list(data.references))
        if not np.isfinite(value):
            raise HarnessError(f"{self.name} came out NaN or infinite: the features of one side have no spread "
                               "(or came out NaN); pass more prompts or seeds.")
        return {"value": value, "features": self.features_name, "resize": self.resize,
                "n": len(data.images), "reference_n": len(data.references)}


def frechet(extract, images, references) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    height, width = np.asarray(images[0]).shape[:2]
    metric = FrechetInceptionDistance(feature=Features(extract), input_img_size=(3, height, width),
                                      reset_real_features=False)
    metric.set_dtype(torch.float64)
    for real, pictures in ((True, references), (False, images)):
        for start in range(0, len(pictures), BATCH):
            metric.update(as_uint8(pictures[start:start + BATCH]), real=real)
    return max(float(metric.compute()), 0.0)


def embed(extract, pictures) -> torch.Tensor:
    return torch.cat([extract(as_uint8(pictures[start:start + BATCH])).double()
                      for start in range(0, len(pictures), BATCH)])


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
            unbiased: bool = False) -> float:
    """Squared MMD with the Gaussian kernel exp(-|a - b|^2 / (2 sigma^2)), times ``scale`` (CMMD's estimator)."""
    gamma = 1 / (2 * sigma**2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor, same: bool) -> torch.Tensor:
        kernel = torch.exp(-gamma * torch.cdist(a, b).square())
        if same and unbiased:
            n = a.shape[0]
            return (kernel.sum() - kernel.diagonal().sum()) / (n * (n - 1))
        return kernel.mean()

    return float(scale * (kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False)))


def _weights_failure(metric: str, what: str, error: Exception, fix: str) -> HarnessError:
    return HarnessError(f"{metric} cannot load {what}: {one_line(error).rstrip('.')}; {fix}")


class InceptionMetric(SetMetric):
    features_name = "Inception-V3 pool3 (2048, torch-fidelity weights, as pytorch-fid)"
    resize = "299x299, torch-fidelity's bilinear resize (as clean-fid recommends)"

    def extractor(self):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            network = FeatureExtractorInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()
        except Exception as error:  # noqa: BLE001 - a missing package or offline weights become one line
            raise _weights_failure(self.name, "the Inception-V3 features", error,
                                   "install torch-fidelity (pip install torch-fidelity, with a torchvision that "
                                   "matches your torch) and run once with network to fetch its weights.") from None

        def extract(images: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                (features,) = network(images)
            return features

        return extract


class Fid(InceptionMetric):
    name = "fid"
    description = "FID to the baseline's pictures: Frechet distance of Inception-V3 features (lower is closer)."

    def distance(self, extract, images, references) -> float:
        return frechet(extract, images, references)


class Kid(InceptionMetric):
    name = "kid"
    description = "KID to the baseline's pictures: unbiased polynomial-kernel MMD of Inception-V3 features."

    @dataclass(frozen=True)
    class Options(harness.Options):
        kid_subset_size: int = setting(1000, "Pictures per KID subset (the smaller of this and each set's size).",
                                       minimum=2)

    def distance(self, extract, images, references) -> float:
        from torchmetrics.image.kid import poly_mmd

        x, y = embed(extract, references), embed(extract, images)
        size = min(self.options.kid_subset_size, len(x), len(y))
        generator = torch.Generator().manual_seed(0)  # the same subsets every run
        values = [float(poly_mmd(x[torch.randperm(len(x), generator=generator)[:size]],
                                 y[torch.randperm(len(y), generator=generator)[:size]]))
                  for _ in range(100)]
        return float(np.mean(values))


class HubModelMetric(SetMetric):
    """Features from a transformers model of the hub (or a local folder saved with save_pretrained)."""

    model_option = ""

    def _load(self, model_class: str, processor_class: str):
        import transformers

        location = getattr(self.options, self.model_option)
        try:
            model = getattr(transformers, model_class).from_pretrained(location, use_safetensors=True).eval()
            processor = getattr(transformers, processor_class).from_pretrained(location)
        except Exception as error:  # noqa: BLE001 - any load failure becomes the one-line fix below
            raise _weights_failure(self.name, f"'{location}'", error,
                                   f"pass --{self.model_option.replace('_', '-')} with a local folder saved with "
                                   "save_pretrained, or run once with network (huggingface-cli login if it "
                                   "asks).") from None
        return model.to(self.config.device), processor


class FdDinov2(HubModelMetric):
    name = "fd-dinov2"
    description = "Frechet distance to the baseline's pictures on DINOv2 features (Stein et al. 2023)."
    model_option = "dinov2_model"
    resize = "224x224 bicubic, the DINOv2 image processor's"

    @dataclass(frozen=True)
    class Options(harness.Options):
        dinov2_model: str = setting("facebook/dinov2-large", "DINOv2 model for fd-dinov2: a hub id or a local "
                                                             "folder (safetensors).")

    def extractor(self):
        model, processor = self._load("AutoModel", "AutoImageProcessor")
        self.features_name = f"DINOv2 CLS token ({self.options.dinov2_model})"

        def extract(images: torch.Tensor) -> torch.Tensor:
            inputs = processor(images=list(images), return_tensors="pt").to(self.config.device)
            with torch.inference_mode():
                return model(**inputs).last_hidden_state[:, 0].cpu()

        return extract

    def distance(self, extract, images, references) -> float:
        return frechet(extract, images, references)


class Cmmd(HubModelMetric):
    name = "cmmd"
    description = "CMMD to the baseline's pictures: RBF-kernel MMD of CLIP embeddings (Jayasumana et al. 2024)."
    model_option = "cmmd_clip_model"

    @dataclass(frozen=True)
    class Options(harness.Options):
        cmmd_clip_model: str = setting("openai/clip-vit-large-patch14-336", "CLIP model for cmmd: a hub id or a "
                                                                            "local folder (safetensors).")
        cmmd_estimator: str = setting("published", "published: the paper's released code (full kernel means); "
                                                   "unbiased: without the diagonals.",
                                      choices=("published", "unbiased"))

    def extractor(self):
        model, processor = self._load("CLIPModel", "CLIPProcessor")
        size = processor.image_processor.crop_size
        self.features_name = f"CLIP image embeddings ({self.options.cmmd_clip_model}), unit length"
        self.resize = f"{size['height']}x{size['width']}, the CLIP processor's bicubic resize and centre crop"

        def extract(images: torch.Tensor) -> torch.Tensor:
            inputs = processor(images=list(images), return_tensors="pt").to(self.config.device)
            with torch.inference_mode():
                embeddings = model.get_image_features(**inputs)
            if not isinstance(embeddings, torch.Tensor):  # transformers 5: the projection is the pooler output
                embeddings = embeddings.pooler_output
            return torch.nn.functional.normalize(embeddings, dim=-1).cpu()

        return extract

    def distance(self, extract, images, references) -> float:
        return mmd_rbf(embed(extract, references), embed(extract, images),
                       unbiased=self.options.cmmd_estimator == "unbiased")


@harness.hookimpl
def register_metrics(register):
    for metric in (Fid, Kid, FdDinov2, Cmmd):
        register(metric)
