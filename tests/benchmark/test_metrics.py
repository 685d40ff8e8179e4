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


def test_ssim_on_images_smaller_than_its_window_says_what_to_change(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "1", "--compare_baseline", "--baseline_steps", "1", "--metric", "ssim",
                    "psnr", "--height", "8", "--width", "8", "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output  # the timings stand; the metric that cannot run says why
    message = ("ValueError: SSIM needs images of at least 11x11 pixels for its window, these are 8x8; pass --height "
               "and --width of 16 or more, or --metric psnr")
    assert f"Warning: metric ssim on flash-lcm 1 steps: {message}" in result.output
    flash = record_json(outdir)[1]
    assert flash["metrics"]["ssim"] == {"error": message} and "value" in flash["metrics"]["psnr"]

def test_reference_metrics_without_a_baseline_say_what_to_add(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    assert invoke("bench", "--steps", "2", "--metric", "psnr", "--outdir", outdir, *FAST).exit_code == 0
    [record] = record_json(outdir)
    assert record["metrics"]["psnr"] == {"skipped": "no baseline in this run to compare with: add --compare_baseline"}


def test_no_quality_metric_runs_on_random_weights(tmp_path):
    from harness.benchmark.plan import Task
    from harness.benchmark.runner import BenchRun
    from harness.benchmark.spec import BenchSpec
    from harness.hooks.registry import get_registry

    spec = BenchSpec(samplers=("flash-lcm",), steps=(2,), prompts=("p",), model="sd15-arch", outdir=tmp_path,
                     metrics=("psnr",))
    scoring = BenchRun(spec, get_registry()).scoring
    task = Task("flash-lcm", 2, 0.0, False, "")
    scoring.start(task, first_baseline=False, run_has_baseline=True)
    scores = scoring.finish(task, [], succeeded=True)
    assert scores == {"psnr": {"skipped": "random weights, timing only: quality metrics mean nothing here"}}


def test_unknown_metric_lists_the_known_ones():
    result = invoke("bench", "--dry-run", "--metric", "is")  # Inception score: not a harness metric
    assert result.exit_code == 2
    assert ("unknown metric 'is'; known metrics: clip-score, cmmd, coverage, fd-dinov2, fd-lab, fid, fidelity, kid, "
            "pickscore, psnr, ssim." in result.output)


def test_plugins_lists_metrics():
    import json

    rows = json.loads(invoke("plugins", "--json").output)
    assert {row["name"]: row["kind"] for row in rows}.get("psnr") == "metric"


def test_fidelity_is_perfect_on_renders_of_the_prompt_and_low_on_other_prompts():
    import random

    import torch
    from harness_plugins.fidelity import FidelityMetric

    from harness.benchmark.metric import MetricConfig, MetricInput
    from harness.lab.scenes import draw_scene, render_scene, sample_caption
    from harness.lab.shapes import all_attributes, caption, render

    rng = random.Random(0)
    captions = [sample_caption(rng) for _ in range(40)]
    images = [render_scene(draw_scene(text, rng)) for text in captions]
    prompts = [text.text() for text in captions]
    metric = FidelityMetric(MetricConfig(torch.device("cpu")))
    scores = metric.score(MetricInput(images, prompts))
    assert scores["value"] == scores["overall"] == scores["commitment"] == 1.0 and scores["n"] == 40
    assert metric.score(MetricInput(images, prompts[1:] + prompts[:1]))["value"] < 0.6
    # Prompts of the closed grammar are prompts of the open one.
    closed = all_attributes()[::97]
    assert metric.score(MetricInput([render(attrs) for attrs in closed], [caption(attrs) for attrs in closed]))[
        "value"] == 1.0


def test_coverage_is_high_on_independent_renders_and_low_on_one_repeated_layout():
    import random

    import torch
    from harness_plugins.fidelity import CoverageMetric

    from harness.benchmark.metric import MetricConfig, MetricInput
    from harness.errors import HarnessError
    from harness.lab.scenes import draw_scene, held_out_prompts, parse, render_scene

    def pictures(scene_rng):
        return [render_scene(draw_scene(parse(text), scene_rng(text, seed), allow_held_out=True))
                for text in held_out_prompts() for seed in range(4)]

    prompts = [text for text in held_out_prompts() for _ in range(4)]
    metric = CoverageMetric(MetricConfig(torch.device("cpu")))
    scores = metric.score(MetricInput(pictures(lambda text, seed: random.Random(f"{text}/{seed}")), prompts))
    assert scores["value"] >= 0.85 and scores["n"] == 256
    assert {"tv_size", "tv_position", "tv_background"} <= set(scores)
    one_layout = metric.score(MetricInput(pictures(lambda text, seed: random.Random(0)), prompts))
    assert one_layout["value"] <= scores["value"] - 0.25

    closed = "a small red circle at the top on a blue background"
    with pytest.raises(HarnessError, match="at least two pictures of a caption that leaves something open"):
        metric.score(MetricInput([picture()], [closed]))
    with pytest.raises(HarnessError, match="coverage scores prompts of the shapes grammar only"):
        metric.score(MetricInput([picture()], ["a cat wearing sunglasses"]))


def test_fidelity_on_bench_records_per_attribute_scores_and_refuses_other_prompts(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "2", "--metric", "fidelity", "--outdir", outdir,
                    "--prompt", "a large red square in the centre on a blue background", *FAST)
    assert result.exit_code == 0, result.output
    [record] = record_json(outdir)
    scores = record["metrics"]["fidelity"]
    # The prompt states all five attributes; the judge adds count, commitment and overall.
    assert set(scores) == {"value", "overall", "commitment", "count", "shape", "colour", "background", "position",
                           "size", "n", "higher_is_better", "metric_s"}
    assert scores["value"] == scores["overall"]
    assert 0 <= scores["value"] <= 1 and scores["n"] == 1

    result = invoke("bench", "--steps", "2", "--metric", "fidelity", "--outdir", tmp_path / "other",
                    "--prompt", "a cat wearing sunglasses", *FAST)
    assert result.exit_code == 0
    [record] = record_json(tmp_path / "other")
    assert record["metrics"]["fidelity"]["error"].startswith("fidelity scores prompts of the shapes grammar only")
    assert "Warning: metric fidelity on flash-lcm 2 steps" in result.output
