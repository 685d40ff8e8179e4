"""fd-lab: the Frechet distance on the lab judge's readings - its maths against an independent computation,
what it tells apart, and its refusals."""

import random

import numpy as np
import pytest
import torch
from harness_plugins.lab_distance import FdLab, lab_features, lab_features_names
from PIL import ImageFilter

import harness
from harness.lab import shapes


def renders(count, seed, resolution=64):
    rng = random.Random(seed)
    return [shapes.render(shapes.sample_attributes(rng), resolution) for _ in range(count)]


def fd_lab(images, references):
    return FdLab(harness.MetricConfig(torch.device("cpu"))).score(
        harness.MetricInput(images, [""] * len(images), references))


def frechet_oracle(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of the Gaussians fitted to two feature sets, as Heusel et al. define it, computed
    another way than torchmetrics: tr((S1 S2)^(1/2)) as tr((S1^(1/2) S2 S1^(1/2))^(1/2)), symmetric roots."""
    def sqrt_psd(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrt_psd(cov_a)
    cross = np.trace(sqrt_psd(root_a @ cov_b @ root_a))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def test_features_read_what_a_render_shows():
    attrs = shapes.ShapeAttributes("square", "red", "blue", "left", "large")
    features = dict(zip(lab_features_names(), lab_features(shapes.render(attrs, 64))))
    assert len(lab_features_names()) == len(lab_features(shapes.render(attrs, 64)))
    assert features["background=blue"] == 1 and features["count=1"] == 1 and features["colour=red"] == 1
    assert features["shape=square"] == 1 and features["position=left"] == 1 and features["large"] == 1
    assert features["solidity"] > 0.9


def test_the_distance_is_the_frechet_distance_of_the_features():
    images, references = renders(48, seed=1), renders(40, seed=2)
    expected = frechet_oracle(np.stack([lab_features(i) for i in images]),
                              np.stack([lab_features(r) for r in references]))
    result = fd_lab(images, references)
    assert result["value"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert (result["n"], result["reference_n"]) == (48, 40)


def test_a_set_against_itself_is_about_zero_and_smears_or_one_layout_are_far():
    images = renders(64, seed=3)
    same = fd_lab(images, images)["value"]
    other_seed = fd_lab(renders(64, seed=4), images)["value"]
    smeared = fd_lab([image.filter(ImageFilter.GaussianBlur(4)) for image in images], images)["value"]
    one_layout = fd_lab([images[0]] * 63 + [images[1]], images)["value"]
    assert same < 1e-6
    # "Far": more than twice the distance between two seeds of the same distribution (its noise at 64 images).
    assert smeared > 2 * other_seed and one_layout > 2 * other_seed


def test_too_few_images_are_refused_in_one_line():
    with pytest.raises(harness.HarnessError, match="at least 2 pictures on each side"):
        fd_lab(renders(1, seed=5), renders(8, seed=6))
