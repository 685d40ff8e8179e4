"""fid, kid, fd-dinov2 and cmmd: their maths against independent computations on fixed features, cmmd end to
end on a small local CLIP, and a one-line refusal when their weights or packages are missing."""

import random

import numpy as np
import pytest
import torch
from harness_plugins import set_metrics
from harness_plugins.set_metrics import Cmmd, FdDinov2, Fid, Kid, as_uint8, mmd_rbf
from PIL import ImageOps

import harness
from harness.lab import shapes
from tests.plugins.test_clip_score import tiny_clip  # noqa: F401 - the fixture, shared
from tests.plugins.test_lab_distance import frechet_oracle


def renders(count, seed):
    rng = random.Random(seed)
    return [shapes.render(shapes.sample_attributes(rng), 32) for _ in range(count)]


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """A fixed feature map for the maths tests: mean colour of each image quadrant (12 values, 0 to 1)."""
    quadrants = (images.double() / 255).unfold(2, 16, 16).unfold(3, 16, 16)  # N, 3, 2, 2, 16, 16
    return quadrants.mean(dim=(-1, -2)).flatten(1)


def metric(cls, **options):
    return cls(harness.MetricConfig(torch.device("cpu")), cls.Options(**options))


def published_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """The estimator of CMMD's released code: full means of the three Gaussian kernel matrices, times 1000."""
    def k(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-d2 / (2 * 10.0**2))
    return float(1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))


def test_frechet_distance_of_fixed_features_matches_the_definition():
    images, references = renders(40, 1), renders(30, 2)
    expected = frechet_oracle(pixel_features(set_metrics.as_uint8(images)).numpy(),
                              pixel_features(set_metrics.as_uint8(references)).numpy())
    fid = metric(Fid)
    fid.extractor = lambda: pixel_features
    assert fid.score(harness.MetricInput(images, [""] * 40, references))["value"] == pytest.approx(expected, rel=1e-6)
    assert fid.score(harness.MetricInput(images, [""] * 40, images))["value"] < 1e-6


def test_cmmd_is_the_published_estimator_and_the_unbiased_one_drops_the_diagonals():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)), rng.normal(0.5, 1.2, size=(40, 8))
    assert mmd_rbf(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(published_cmmd(x, y), rel=1e-9)
    assert mmd_rbf(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-9)
    n, m = len(x), len(y)

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 200)
    unbiased = 1000 * ((k(x, x).sum() - n) / (n * (n - 1)) + (k(y, y).sum() - m) / (m * (m - 1))
                       - 2 * k(x, y).mean())
    assert mmd_rbf(torch.from_numpy(x), torch.from_numpy(y), unbiased=True) == pytest.approx(unbiased, rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_grows_for_another(monkeypatch):
    monkeypatch.setattr(Kid, "extractor", lambda self: pixel_features)
    kid = metric(Kid, kid_subset_size=20)
    same = kid.score(harness.MetricInput(renders(40, 3), [""] * 40, renders(40, 4)))["value"]
    inverted = [ImageOps.invert(image) for image in renders(40, 3)]  # other colours: other features
    other = kid.score(harness.MetricInput(inverted, [""] * 40, renders(40, 4)))["value"]
    assert abs(same) < other


def test_cmmd_end_to_end_on_a_local_clip(tiny_clip):  # noqa: F811 - the shared fixture
    cmmd = metric(Cmmd, cmmd_clip_model=str(tiny_clip))
    images, references = renders(12, 5), renders(10, 6)
    result = cmmd.score(harness.MetricInput(images, [""] * 12, references))
    extract = cmmd.extractor()
    expected = published_cmmd(extract(as_uint8(references)).double().numpy(),
                              extract(as_uint8(images)).double().numpy())
    assert result["value"] == pytest.approx(expected, rel=1e-6)
    assert result["features"].startswith("CLIP image embeddings") and result["resize"].startswith("32x32")
    assert cmmd.score(harness.MetricInput(images, [""] * 12, images))["value"] == pytest.approx(0.0, abs=1e-6)


def test_missing_weights_or_packages_are_one_line_naming_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_fidelity(name, *args, **kwargs):
        if name.startswith("torch_fidelity"):
            raise ModuleNotFoundError("No module named 'torch_fidelity'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fidelity)
    images = renders(4, 7)
    with pytest.raises(harness.HarnessError, match=r"^fid cannot load the Inception-V3 features: .*torch_fidelity.*"
                                                   r"install torch-fidelity"):
        metric(Fid).score(harness.MetricInput(images, [""] * 4, images))
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(harness.HarnessError, match=r"^fd-dinov2 cannot load '.*nowhere'.*--dinov2-model"):
        metric(FdDinov2, dinov2_model=str(tmp_path / "nowhere")).score(harness.MetricInput(images, [""] * 4, images))


def test_one_image_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(Fid, "extractor", lambda self: pixel_features)
    with pytest.raises(harness.HarnessError, match="fid needs at least 2 pictures on each side, this measurement "
                                                   "has 1"):
        metric(Fid).score(harness.MetricInput(renders(1, 8), [""], renders(4, 9)))


def test_nan_features_and_a_reference_of_other_features_are_one_line(monkeypatch):
    monkeypatch.setattr(Fid, "extractor", lambda self: lambda images: torch.full((len(images), 12), float("nan")))
    with pytest.raises(harness.HarnessError, match=r"^fid: the features of 4 pictures came out NaN or infinite; "
                                                   r"check the pictures"):
        metric(Fid).score(harness.MetricInput(renders(4, 10), [""] * 4, renders(4, 11)))
    monkeypatch.setattr(Fid, "extractor", lambda self: pixel_features)
    fid = metric(Fid)
    fid.use_reference_statistics({"mu": np.zeros(5), "sigma": np.eye(5)}, "statistics 'other.npz'")
    fid.reset()
    fid.update(harness.MetricInput(renders(4, 12), [""] * 4))
    with pytest.raises(harness.HarnessError, match=r"the reference \(statistics 'other.npz'\) has 5 features, these "
                                                   r"pictures 12"):
        fid.compute()


@pytest.mark.parametrize("cls", [Fid, Kid])
def test_feature_sums_merged_from_two_processes_equal_one_process(cls):
    images = renders(30, 13)
    one, rank0, rank1 = metric(cls), metric(cls), metric(cls)
    for each in (one, rank0, rank1):
        each.extractor = lambda: pixel_features
        each.reset()
    one.update(harness.MetricInput(images, [""] * 30))
    rank0.update(harness.MetricInput(images[0::2], [""] * 15, indices=range(0, 30, 2)))
    rank1.update(harness.MetricInput(images[1::2], [""] * 15, indices=range(1, 30, 2)))
    rank0.merge([rank1.state()])
    assert set(one.statistics()) == ({"mu", "sigma", "features"} if cls is Kid else {"mu", "sigma"})
    for name, array in one.statistics().items():
        assert np.allclose(rank0.statistics()[name], array, rtol=1e-12, atol=1e-15), name
