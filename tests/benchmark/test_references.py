"""Streaming measurement and what set metrics compare with: images pass through the metrics in bounded
batches and are dropped; --save_images, --reference, --reference_stats and --save_stats, and their refusals
(one line, exit 2, no run folder)."""

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from harness.benchmark import distributed, timing
from harness.benchmark.measure import METRIC_BATCH, measure_share
from harness.benchmark.sampler import GenerationRequest
from tests.conftest import invoke, record_json

FAST = ("--model", "embedded", "--steps", "2", "--warmup", "0", "--repeats", "1", "--seed", "0", "--quiet")


class ManyPictures:
    """A sampler stand-in that makes one small picture per call and remembers each one weakly."""

    def __init__(self):
        self.made: list[weakref.ref] = []

    def check(self, request):
        return []

    def components(self):
        return {}

    def generate(self, request):
        image = Image.new("RGB", (16, 16), (request.seeds[0] % 256, 0, 0))
        self.made.append(weakref.ref(image))
        return [image]


def test_a_measurement_hands_its_images_on_in_bounded_batches_and_keeps_none():
    sampler = ManyPictures()
    requests = [GenerationRequest(f"p{i}", 2, 0.0, (i,)) for i in range(100)]
    batches, alive_during = [], []

    def consume(batch):
        batches.append(list(batch.positions))
        gc.collect()
        alive_during.append(sum(ref() is not None for ref in sampler.made))

    share = measure_share(sampler, requests, 0.0, torch.device("cpu"), timing.TimingSettings(1, 2),
                          distributed.SINGLE_PROCESS, consume)
    # Only the first measured pass reaches the metrics, every image once, in order, at most 32 at a time.
    assert [index for batch in batches for index in batch] == list(range(100))
    assert max(len(batch) for batch in batches) == METRIC_BATCH
    assert max(alive_during) <= METRIC_BATCH + 1  # the batch itself, and the call just made
    gc.collect()
    assert sum(ref() is not None for ref in sampler.made) == 0  # nothing kept once measured
    assert share.image_count == 100 and share.images == {} and share.deterministic


def stats_file(path, size, **extra):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, size))
    arrays = {"mu": features.mean(0), "sigma": np.cov(features, rowvar=False), **extra}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ("--metric", "fd-lab", "--reference_stats", f"fd-lab={stats_file(tmp / 's.npz', 10)}"),
     "the file describes 10 features, fd-lab computes 33; pass statistics written for fd-lab"),
    (lambda tmp: ("--metric", "fd-lab", "--reference_stats",
                  f"fd-lab={(tmp / 'r.txt').write_text('x') and tmp / 'r.txt'}"),
     "is not a .npz file (a zip of numpy arrays)"),
    (lambda tmp: ("--metric", "fd-lab", "--reference_stats", f"fd-lab={tmp / 'none.npz'}"),
     "does not exist; pass a .npz statistics file"),
    (lambda tmp: ("--metric", "fd-lab", "--reference_stats",
                  f"fd-lab={stats_file(tmp / 'n.npz', 33, mu=np.full(33, np.nan))}"),
     "has NaN or infinite values in mu"),
    (lambda tmp: ("--metric", "kid", "--reference_stats", f"kid={stats_file(tmp / 'k.npz', 2048)}"),
     "kid compares features, not a mean and covariance, and the file has none"),
    (lambda tmp: ("--metric", "psnr", "--reference_stats", f"fd-lab={stats_file(tmp / 'p.npz', 33)}"),
     "'fd-lab' is not a set metric of this run (its set metrics: none); add --metric fd-lab"),
    (lambda tmp: ("--metric", "fd-lab", "--reference_stats", "fd-lab"), "is not METRIC=FILE"),
    (lambda tmp: ("--metric", "psnr", "--reference", tmp), "--reference is what set metrics compare with"),
    (lambda tmp: ("--metric", "psnr", "--save_stats", tmp / "stats"), "--save_stats writes the statistics of set"),
    (lambda tmp: ("--metric", "fd-lab", "--reference", tmp / "nowhere"), "is not a folder"),
    (lambda tmp: ("--metric", "fd-lab", "--save_stats", (tmp / "file").write_text("") or tmp / "file"),
     "is not a folder harness can write to"),
])
def test_bad_references_are_refused_before_the_run_folder_exists(tmp_path, embedded_model, make_args, message):
    result = invoke("bench", *FAST, *make_args(tmp_path), "--outdir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_reference_folder_of_another_size_or_too_small_is_refused(tmp_path, embedded_model):
    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    result = invoke("bench", *FAST, "--metric", "fd-lab", "--reference", folder, "--outdir", tmp_path / "run")
    assert result.exit_code == 2 and "holds 1 picture(s)" in result.output
    Image.new("RGB", (48, 64)).save(folder / "b.jpg")
    result = invoke("bench", *FAST, "--metric", "fd-lab", "--reference", folder, "--outdir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "'b.jpg' is 48x64, the run's pictures are 64x64; resize the reference set" in result.output
    assert not (tmp_path / "run").exists()


def test_a_reference_folder_is_what_set_metrics_compare_with(tmp_path, embedded_model):
    from harness.lab import shapes

    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = __import__("random").Random(0)
    for index in range(12):
        shapes.render(shapes.sample_attributes(rng), 64).save(folder / f"{index}.png")
    result = invoke("bench", *FAST, "--prompts", "held-out", "--prompt_count", "6", "--num_images", "2",
                    "--metric", "fd-lab", "--reference", folder, "--save_stats", tmp_path / "stats",
                    "--save_images", "none", "--outdir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    [record] = record_json(tmp_path / "run")
    fd_lab = record["metrics"]["fd-lab"]
    assert fd_lab["reference"] == f"folder '{folder}' (12 pictures)" and fd_lab["reference_n"] == 12
    assert fd_lab["n"] == 12 and fd_lab["value"] > 0
    assert record["images"] == [] and record["grid"] == "" and record["images_made"] == 12
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latency.png", "prompts.json", "quality.png", "records.jsonl", "summary.md"]
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["fd-lab_flash-lcm_2steps.npz",
                                                                      "fd-lab_reference.npz"]


def test_a_metric_that_cannot_read_the_reference_folder_records_why_and_the_others_run(tmp_path, embedded_model,
                                                                                     monkeypatch):
    from harness_plugins.set_metrics import Fid

    from harness import HarnessError

    def no_weights(self):
        raise HarnessError("fid cannot load the Inception-V3 features: offline; install torch-fidelity.")

    monkeypatch.setattr(Fid, "extractor", no_weights)
    folder = tmp_path / "pictures"
    folder.mkdir()
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 80, 0, 0)).save(folder / f"{index}.png")
    result = invoke("bench", *FAST, "--prompts", "held-out", "--prompt_count", "3", "--metric", "fid", "fd-lab",
                    "--reference", folder, "--outdir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert result.output.count("metric fid: cannot read the --reference pictures: fid cannot load") == 1
    [record] = record_json(tmp_path / "run")
    assert record["metrics"]["fid"] == {"error": "cannot read the --reference pictures: fid cannot load the "
                                                 "Inception-V3 features: offline; install torch-fidelity."}
    assert record["metrics"]["fd-lab"]["value"] > 0


def test_save_images_grids_keeps_the_first_pictures_and_the_grids(tmp_path, embedded_model):
    result = invoke("bench", *FAST, "--prompts", "held-out", "--prompt_count", "40", "--save_images", "grids",
                    "--outdir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    [record] = record_json(tmp_path / "run")
    assert record["images_made"] == 40 and len(record["images"]) == 32
    assert record["images"][-1] == "image_s2_i31_seed0.png"
    assert len(list((tmp_path / "run").glob("image_*.png"))) == 32
    assert (tmp_path / "run" / record["grid"]).is_file()
    assert record["config"]["save_images"] == "grids" and record["config"]["prompts_count"] == 40
    assert "prompts" not in record["config"]


class BrokenOnTheBaseline:
    """A set metric that cannot take the baseline's pictures as its reference."""

    name = "broken-set"
    higher_is_better = False
    needs_reference = False
    reference_set = True

    def reset(self):
        pass

    def update(self, batch):
        pass

    def state(self):
        return None

    def merge(self, states):
        pass

    def use_as_reference(self, label):
        raise ValueError("no spread in the baseline's features")

    def compute(self):
        raise AssertionError("never computed without a reference")


def test_a_set_metric_that_failed_on_the_baseline_is_skipped_later_naming_why():
    from harness.benchmark.measure import Scoring
    from harness.benchmark.metric import MetricInput
    from harness.benchmark.plan import Task

    scoring = Scoring({"broken-set": BrokenOnTheBaseline()}, None, lambda _: None, lambda name: None)
    baseline = Task("vanilla-sd", 30, 7.5, True, "baseline", "baseline")
    few = Task("flash-lcm", 2, 0.0, False, "", "flash")
    batch = MetricInput([Image.new("RGB", (8, 8))], ["p"], indices=[0])
    scoring.start(baseline, first_baseline=True, run_has_baseline=True)
    scoring.update(batch, baseline)
    assert scoring.finish(baseline, [], succeeded=True) == {
        "broken-set": {"error": "ValueError: no spread in the baseline's features"}}
    scoring.commit_reference(baseline)
    scoring.start(few, first_baseline=False, run_has_baseline=True)
    scoring.update(batch, few)
    assert scoring.finish(few, [], succeeded=True) == {
        "broken-set": {"skipped": "broken-set failed on the baseline's pictures; see the baseline's record"}}
