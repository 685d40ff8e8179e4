"""fd-lab: a Frechet distance for the offline lab, on features that ship with harness and need no network.

FID (Heusel et al. 2017) compares two sets of pictures by the Gaussians fitted to their Inception-V3
features; its features need weights from the network. ``fd-lab`` keeps the distance and swaps the features
for what the embedded lab's pixel judge (``harness.lab.judge.read``) sees in a picture, as a vector
(:func:`lab_features`): the background colour, the number of objects, the share of object area in each
colour, the share of objects of each shape, size and position, how solid the ink is and how far the
background drifted from its palette colour. Like FID it sees both what is drawn (a smear has no solid
object) and how varied it is (a sampler that puts every object in one place has a narrow position
histogram), so it is a distribution metric the lab can compute on a laptop: a student far from its
teacher's distribution of pictures scores high even when every single picture is plausible.

The maths is the other set metrics' (``harness_plugins.set_metrics``): a state of the features' count, sum
and sum of outer products that updates batch by batch and merges across processes by adding, and
torchmetrics' computation of ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` from the two sets' means and
covariances.
"""

from __future__ import annotations

import numpy as np
import torch
from harness_plugins.set_metrics import SetMetric, frechet_distance
from PIL import Image

import harness
from harness.lab import judge, shapes

POSITIONS = tuple(shapes.ANCHORS)
COUNTS = 5  # 0, 1, 2, 3, 4 or more objects


def lab_features(image: Image.Image) -> np.ndarray:
    """The judge's reading of one picture as a fixed-length vector (see the module docstring)."""
    reading = judge.read(image.convert("RGB"))
    objects = reading.objects
    area = sum(seen.area for seen in objects) or 1
    count = np.zeros(COUNTS)
    count[min(len(objects), COUNTS - 1)] = 1
    background = [float(reading.background == name) for name in shapes.COLOUR_NAMES]
    colour = [sum(seen.area for seen in objects if seen.colour == name) / area for name in shapes.COLOUR_NAMES]
    share = 1 / max(len(objects), 1)
    shape = [share * sum(seen.shape == name for seen in objects) for name in shapes.SHAPES]
    position = [share * sum(seen.position == name for seen in objects) for name in POSITIONS]
    large = [share * sum(seen.size == "large" for seen in objects)]
    ink = [sum(seen.area for seen in objects) / (image.width * image.height)]
    rest = [reading.solidity, reading.background_drift / 255]
    return np.concatenate([background, count, colour, shape, position, large, ink, rest]).astype(np.float64)


def lab_features_names() -> list[str]:
    """The name of each value of :func:`lab_features`, in order."""
    return ([f"background={name}" for name in shapes.COLOUR_NAMES] + [f"count={n}" for n in range(COUNTS)]
            + [f"colour={name}" for name in shapes.COLOUR_NAMES] + [f"shape={name}" for name in shapes.SHAPES]
            + [f"position={name}" for name in POSITIONS] + ["large", "ink", "solidity", "background_drift"])


def extract(images: torch.Tensor) -> torch.Tensor:
    """``lab_features`` over a batch: uint8 pictures (N, 3, H, W) in, (N, D) out."""
    pictures = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]
    return torch.from_numpy(np.stack([lab_features(picture) for picture in pictures]))


class FdLab(SetMetric):
    name = "fd-lab"
    description = ("Frechet distance to the reference pictures (the baseline's, --reference or --reference_stats) on "
                   "the lab judge's readings; needs no network; lower is closer.")
    dimensions = len(lab_features_names())
    features_name = f"lab judge readings ({len(lab_features_names())} values)"
    resize = "none (the judge reads each picture at its own size)"

    def extractor(self):
        return extract

    distance = staticmethod(frechet_distance)


@harness.hookimpl
def register_metrics(register):
    register(FdLab)
