"""Set metrics of the field: fid, kid, fd-dinov2 and cmmd, each against a reference set of pictures.

A set metric compares the distribution of a measurement's pictures with a reference set's, not picture by
picture: the first baseline of the run (``--compare_baseline``: how far a student is from its teacher), a
folder of pictures (``--reference DIR``) or published statistics (``--reference_stats fid=FILE.npz``). The
pictures stream through the feature network batch by batch as they are made; what is kept is the features'
count, sum and sum of outer products (``FeatureSet``: O(D^2) memory for any number of pictures, merged across
processes by adding), plus the features themselves for the kernel metrics, kid and cmmd. Each records which
features, which resize and which reference it used, since numbers from other features or resizes are not
comparable.

- ``fid`` (Heusel et al. 2017): Frechet distance of Inception-V3 pool features, torchmetrics' computation of
  the distance with torch-fidelity's Inception weights (as pytorch-fid computes them); pictures resized
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
from harness_plugins.clip_score import on_device

import harness
from harness import HarnessError, Metric, MetricInput, one_line, setting

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


def as_uint8(images) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


class FeatureSet:
    """A set's features as the metrics need them, mergeable across processes: the count, the sum and the sum of
    outer products (a mean and covariance of any number of pictures in O(D^2) memory), and, for kernel metrics,
    the features themselves (by picture index, so every process count gives the same order)."""

    def __init__(self, keep_features: bool):
        self.n = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.kept: dict[int, torch.Tensor] | None = {} if keep_features else None

    def add(self, features: torch.Tensor, indices) -> None:
        features = features.double()
        if self.total is None:
            self.total = torch.zeros(features.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.n += features.shape[0]
        self.total += features.sum(0)
        self.outer += features.T @ features
        if self.kept is not None:
            self.kept.update({int(index): row.float() for index, row in zip(indices, features)})

    def merge(self, other: FeatureSet) -> None:
        if other.total is None:
            return
        if self.total is None:
            self.total, self.outer = other.total.clone(), other.outer.clone()
        else:
            self.total += other.total
            self.outer += other.outer
        self.n += other.n
        if self.kept is not None and other.kept is not None:
            self.kept.update(other.kept)

    def arrays(self) -> dict[str, np.ndarray]:
        """``mu`` and ``sigma`` (the unbiased covariance, as pytorch-fid's np.cov), ``features`` when kept."""
        assert self.total is not None and self.outer is not None and self.n >= 2
        mu = self.total / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        arrays = {"mu": mu.numpy(), "sigma": sigma.numpy()}
        if self.kept is not None:
            arrays["features"] = torch.stack([self.kept[i] for i in sorted(self.kept)]).double().numpy()
        return arrays


class SetMetric(Metric):
    """A distance between the measurement's pictures and a reference set, on features of ``extractor()``.

    The reference is the first baseline's pictures of the run, ``--reference DIR`` or ``--reference_stats``;
    :meth:`score` with ``data.references`` takes those pictures as the reference (handy outside a run).
    """

    higher_is_better = False
    reference_set = True
    features_name: str = ""
    resize: str = ""

    def __init__(self, config, options=None):
        super().__init__(config, options)
        self.seen = FeatureSet(self.needs_features)
        self.reference: dict[str, np.ndarray] | None = None
        self.reference_label = ""
        self.reference_n: int | None = None  # pictures behind the reference, when known
        self._extract = None

    @abstractmethod
    def extractor(self):
        """A callable: uint8 pictures (N, 3, H, W) -> features (N, D); loads its weights on first use."""

    @abstractmethod
    def distance(self, pictures: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
        """The metric between two sets' statistics (``FeatureSet.arrays()``)."""

    def score(self, data: MetricInput) -> dict[str, Any]:
        if data.references is not None:
            self.reset()
            self.update(MetricInput(data.references, [""] * len(data.references)))
            self._check_size(self.seen.n, "reference")
            self.use_as_reference("the given references")
        return super().score(MetricInput(data.images, data.prompts, indices=data.indices))

    def reset(self) -> None:
        self.seen = FeatureSet(self.needs_features)

    def update(self, batch: MetricInput) -> None:
        if self._extract is None:
            self._extract = self.extractor()
        features = self._extract(as_uint8(batch.images)).double().cpu()
        if not torch.isfinite(features).all():
            raise HarnessError(f"{self.name}: the features of {len(batch.images)} pictures came out NaN or infinite; "
                               "check the pictures (a blank or NaN decode) and the feature model's weights.")
        self.seen.add(features, batch.positions)

    def state(self) -> FeatureSet:
        return self.seen

    def merge(self, states) -> None:
        for state in states:
            self.seen.merge(state)

    def statistics(self) -> dict[str, np.ndarray]:
        self._check_size(self.seen.n, "this measurement")
        return self.seen.arrays()

    def use_as_reference(self, label: str) -> None:
        self.use_reference_statistics(self.statistics(), label)
        self.reference_n = self.seen.n

    def use_reference_statistics(self, statistics: dict[str, np.ndarray], label: str) -> None:
        self.reference, self.reference_label = statistics, label
        self.reference_n = len(statistics["features"]) if "features" in statistics else None

    def _check_size(self, n: int, side: str) -> None:
        if n < 2:
            raise HarnessError(f"{self.name} needs at least 2 pictures on each side, {side} has {n}; pass more "
                               "prompts or --num_images 2 or more.")

    def compute(self) -> dict[str, Any]:
        if self.reference is None:
            raise HarnessError(f"{self.name} has no reference set; add --compare_baseline, --reference DIR or "
                               "--reference_stats.")
        pictures = self.statistics()
        if pictures["mu"].shape != self.reference["mu"].shape:
            raise HarnessError(f"{self.name}: the reference ({self.reference_label}) has "
                               f"{self.reference['mu'].shape[0]} features, these pictures {pictures['mu'].shape[0]} "
                               f"({self.features_name}); pass statistics written for {self.name} and its model.")
        value = self.distance(pictures, self.reference)
        if not np.isfinite(value):
            raise HarnessError(f"{self.name} came out NaN or infinite: the features of one side have no spread; "
                               "pass more prompts or seeds.")
        return {"value": value, "features": self.features_name, "resize": self.resize, "n": self.seen.n,
                **({"reference_n": self.reference_n} if self.reference_n is not None else {})}


def frechet_distance(pictures: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), by torchmetrics' FID computation, in float64."""
    from torchmetrics.image.fid import _compute_fid

    mu1, sigma1, mu2, sigma2 = (torch.from_numpy(np.asarray(array, dtype=np.float64)) for array in
                                (pictures["mu"], pictures["sigma"], reference["mu"], reference["sigma"]))
    return max(float(_compute_fid(mu1, sigma1, mu2, sigma2)), 0.0)


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
    dimensions = 2048
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
            with on_device(network, self.config.device), torch.inference_mode():
                (features,) = network(images.to(self.config.device))
            return features.cpu()

        return extract


class Fid(InceptionMetric):
    name = "fid"
    description = "FID to the reference pictures: Frechet distance of Inception-V3 features (lower is closer)."
    distance = staticmethod(frechet_distance)


class Kid(InceptionMetric):
    name = "kid"
    needs_features = True
    description = "KID to the reference pictures: unbiased polynomial-kernel MMD of Inception-V3 features."

    @dataclass(frozen=True)
    class Options(harness.Options):
        kid_subset_size: int = setting(1000, "Pictures per KID subset (the smaller of this and each set's size).",
                                       minimum=2)

    def distance(self, pictures, reference) -> float:
        from torchmetrics.image.kid import poly_mmd

        x, y = torch.from_numpy(reference["features"]), torch.from_numpy(pictures["features"])
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
        return model, processor  # on the device only while a batch is read (on_device)


class FdDinov2(HubModelMetric):
    name = "fd-dinov2"
    description = "Frechet distance to the reference pictures on DINOv2 features (Stein et al. 2023)."
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
            with on_device(model, self.config.device), torch.inference_mode():
                return model(**inputs).last_hidden_state[:, 0].cpu()

        return extract

    distance = staticmethod(frechet_distance)


class Cmmd(HubModelMetric):
    name = "cmmd"
    description = "CMMD to the reference pictures: RBF-kernel MMD of CLIP embeddings (Jayasumana et al. 2024)."
    model_option = "cmmd_clip_model"
    needs_features = True

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
            with on_device(model, self.config.device), torch.inference_mode():
                embeddings = model.get_image_features(**inputs)
            if not isinstance(embeddings, torch.Tensor):  # transformers 5: the projection is the pooler output
                embeddings = embeddings.pooler_output
            return torch.nn.functional.normalize(embeddings, dim=-1).cpu()

        return extract

    def distance(self, pictures, reference) -> float:
        return mmd_rbf(torch.from_numpy(reference["features"]), torch.from_numpy(pictures["features"]),
                       unbiased=self.options.cmmd_estimator == "unbiased")


@harness.hookimpl
def register_metrics(register):
    for metric in (Fid, Kid, FdDinov2, Cmmd):
        register(metric)
