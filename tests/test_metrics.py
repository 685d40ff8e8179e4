"""Metric plugins: psnr and ssim on known inputs, and how bench records them."""

import math

import numpy as np
import pytest
from harness_plugins.image_metrics import psnr, ssim
from PIL import Image, ImageChops, ImageDraw

from tests.conftest import invoke, record_json

FAST = ("--warmup", "0", "--repeats", "1", "--quiet")


def picture(offset=0):
    image = Image.new("RGB", (64, 64), (30, 60, 200))
    ImageDraw.Draw(image).ellipse((16 + offset, 16, 48 + offset, 48), fill=(220, 40, 40))
    return image


def test_identical_images_score_perfectly():
    assert psnr(picture(), picture()) == math.inf
    assert ssim(picture(), picture()) == pytest.approx(1.0)


def test_a_shifted_image_scores_lower_and_further_shifts_lower_still():
    near, far = picture(2), picture(8)
    assert psnr(picture(), far) < psnr(picture(), near) < math.inf
    assert ssim(picture(), far) < ssim(picture(), near) < 1.0


def test_psnr_matches_its_definition():
    noisy = Image.fromarray(np.clip(np.asarray(picture(), dtype=np.int16) + 10, 0, 255).astype(np.uint8))
    mse = np.mean((np.asarray(noisy, dtype=np.float64) - np.asarray(picture(), dtype=np.float64)) ** 2)
    assert psnr(noisy, picture()) == pytest.approx(10 * math.log10(255**2 / mse))


def test_ssim_is_symmetric_and_punishes_structure_more_than_brightness():
    brighter = ImageChops.add(picture(), Image.new("RGB", (64, 64), (10, 10, 10)))
    assert ssim(picture(), picture(6)) == pytest.approx(ssim(picture(6), picture()))
    assert ssim(picture(), brighter) > ssim(picture(), picture(6))


@pytest.mark.slow
def test_bench_scores_few_step_images_against_the_baseline(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "--compare_baseline", "--metric", "psnr", "ssim", "--seed", "1",
                    "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    baseline, flash = record_json(outdir)
    assert baseline["metrics"]["psnr"] == {"skipped": "this measurement is the reference"}
    scores = flash["metrics"]
    assert scores["psnr"]["reference"] == "vanilla-sd 30 steps" and scores["ssim"]["reference"] == "vanilla-sd 30 steps"
    # Recompute from the saved files: the record describes exactly those images.
    image = Image.open(outdir / flash["images"][0])
    reference = Image.open(outdir / baseline["images"][0])
    assert scores["psnr"]["value"] == pytest.approx(psnr(image, reference))
    assert scores["ssim"]["value"] == pytest.approx(ssim(image, reference))
    header = next(line for line in (outdir / "summary.md").read_text().splitlines() if line.startswith("| sampler"))
    assert [cell.strip() for cell in header.strip(" |").split("|")][-2:] == ["psnr", "ssim"]


def test_reference_metrics_without_a_baseline_say_what_to_add(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    assert invoke("bench", "--steps", "2", "--metric", "psnr", "--outdir", outdir, *FAST).exit_code == 0
    [record] = record_json(outdir)
    assert record["metrics"]["psnr"] == {"skipped": "no baseline in this run to compare with: add --compare_baseline"}


def test_no_quality_metric_runs_on_random_weights(tmp_path):
    from harness.plugins import get_registry
    from harness.runner import BenchRun, BenchSpec, Reference, Task

    spec = BenchSpec(samplers=("flash-lcm",), steps=(2,), prompts=("p",), model="sd15-arch", outdir=tmp_path,
                     metrics=("psnr",))
    scores = BenchRun(spec, get_registry()).scorer.score(Task("flash-lcm", 2, 0.0, False, ""), [picture(1)], ["p"],
                          Reference("vanilla-sd 30 steps", [picture()]))
    assert scores == {"psnr": {"skipped": "random weights, timing only: quality metrics mean nothing here"}}


def test_unknown_metric_lists_the_known_ones():
    result = invoke("bench", "--dry-run", "--metric", "fid")
    assert result.exit_code == 2
    assert "unknown metric 'fid'; known metrics: clip-score, fidelity, psnr, ssim." in result.output


def test_plugins_lists_metrics():
    import json

    rows = json.loads(invoke("plugins", "--json").output)
    assert {row["name"]: row["kind"] for row in rows}.get("psnr") == "metric"


def test_fidelity_is_perfect_on_renders_of_the_prompt_and_low_on_other_prompts():
    import torch
    from harness_plugins.fidelity import FidelityMetric

    from harness.metric import MetricConfig, MetricInput
    from harness.shapes import all_attributes, caption, render

    attributes = all_attributes()[::97]
    images = [render(attrs) for attrs in attributes]
    prompts = [caption(attrs) for attrs in attributes]
    metric = FidelityMetric(MetricConfig(torch.device("cpu")))
    assert metric.score(MetricInput(images, prompts))["value"] == 1.0
    assert metric.score(MetricInput(images, prompts[1:] + prompts[:1]))["value"] < 0.6


def test_fidelity_on_bench_records_per_attribute_scores_and_refuses_other_prompts(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "--metric", "fidelity", "--outdir", outdir,
                    "--prompt", "a large red square in the centre on a blue background", *FAST)
    assert result.exit_code == 0, result.output
    [record] = record_json(outdir)
    scores = record["metrics"]["fidelity"]
    assert set(scores) == {"value", "shape", "colour", "background", "position", "size", "overall", "n",
                           "higher_is_better"}
    assert 0 <= scores["value"] <= 1 and scores["n"] == 1

    result = invoke("bench", "--steps", "2", "--metric", "fidelity", "--outdir", tmp_path / "other",
                    "--prompt", "a cat wearing sunglasses", *FAST)
    assert result.exit_code == 0
    [record] = record_json(tmp_path / "other")
    assert record["metrics"]["fidelity"]["error"].startswith("fidelity scores prompts of the shapes grammar only")
    assert "Warning: metric fidelity on flash-lcm 2 steps" in result.output
