"""psnr and ssim: how close a sampler's images are to the baseline's for the same prompts and seeds.

"How close is 4-step flash to 30-step SD" becomes one number. Both compare 8-bit RGB pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

import harness
from harness import MetricInput, PerImageMetric

SSIM_WINDOW = 11  # the Gaussian window of Wang et al. (2004), "Image Quality Assessment: ..."
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pixels(image) -> torch.Tensor:
    """(3, H, W) float64 in [0, 255]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf for identical images."""
    mse = torch.mean((_pixels(image) - _pixels(reference)) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(image, reference) -> float:
    """Mean structural similarity over every window position and channel (1 for identical images)."""
    x, y = _pixels(image).unsqueeze(0), _pixels(reference).unsqueeze(0)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels for its window, these are "
                         f"{x.shape[-1]}x{x.shape[-2]}; pass --height and --width of 16 or more, or --metric psnr")
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    gauss = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    window = (gauss[:, None] * gauss[None, :] / gauss.sum() ** 2).expand(3, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t):
        return F.conv2d(t, window, groups=3)  # "valid" windows only, as the reference implementation

    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


class _ReferenceMetric(PerImageMetric):
    needs_reference = True

    def score_batch(self, batch: MetricInput) -> list[float]:
        return [self.compare(image, reference) for image, reference in zip(batch.images, batch.references)]

    def summarize(self, values: list[float], prompts: list[str]) -> dict:
        return {"value": float(np.mean(values)), "per_image": values}


class PsnrMetric(_ReferenceMetric):
    name = "psnr"
    description = "PSNR in dB against the baseline's image for the same prompt and seed (higher: closer)."
    compare = staticmethod(psnr)


class SsimMetric(_ReferenceMetric):
    name = "ssim"
    description = "SSIM (11x11 Gaussian window) against the baseline's image for the same prompt and seed."
    compare = staticmethod(ssim)


@harness.hookimpl
def register_metrics(register):
    register(PsnrMetric)
    register(SsimMetric)
