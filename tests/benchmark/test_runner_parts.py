"""The parts of a benchmark run, each alone: planning, building a record, writing files, scoring."""

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from harness.benchmark import timing
from harness.benchmark.measure import Scoring, Share
from harness.benchmark.metric import Metric, MetricInput
from harness.benchmark.plan import Task, comparison_name, plan
from harness.benchmark.record import RecordContext, RunWriter, build_record
from harness.benchmark.spec import BenchSpec
from harness.hooks.registry import get_registry
from harness.records.schema import Comparison, Stages
from harness.records.store import read_records


def spec(**changes) -> BenchSpec:
    base = BenchSpec(samplers=("flash-lcm", "vanilla-sd"), steps=(2, 4), model="embedded", outdir=Path("run"),
                     prompts=("a", "b"), num_images=2, seed=7)
    return dataclasses.replace(base, **changes)


def test_plan_is_pure_puts_baselines_first_and_never_changes_the_spec():
    asked = spec(prompts=())
    first = plan(asked, get_registry(), "the model's prompt", seed=7)
    assert first == plan(asked, get_registry(), "the model's prompt", seed=7)
    assert [(t.sampler, t.steps, t.guidance_scale, t.folder) for t in first.tasks] == [
        ("vanilla-sd", 30, 7.5, "baseline"), ("flash-lcm", 2, 0.0, ""), ("flash-lcm", 4, 0.0, "")]
    assert first.prompts == ("the model's prompt",) and asked.prompts == ()


def test_requests_draw_image_i_of_prompt_p_from_seed_plus_p_times_n_plus_i():
    planned = plan(spec(batch=1), get_registry(), "", seed=7)
    requests = planned.requests(planned.tasks[1])
    assert [(r.prompt, r.seeds) for r in requests] == [("a", (7,)), ("a", (8,)), ("b", (9,)), ("b", (10,))]
    assert planned.calls_per_task == 4


def test_comparison_names_follow_the_sampler_and_never_collide():
    flash = Task("flash-lcm", 4, 0.0, False, "", "flash")
    student = Task("local-student", 4, 0.0, False, "", "local-student")
    vanilla, ddim = (Task(name, 30, 7.5, True, "baseline", name) for name in ("vanilla-sd", "ddim"))
    assert comparison_name(flash, vanilla, 1, 42) == "compare_baseline30_flash4_seed42.png"  # the seed's name
    assert comparison_name(student, vanilla, 1, None) == "compare_baseline30_local-student4.png"
    assert comparison_name(flash, vanilla, 2, 42) != comparison_name(flash, ddim, 2, 42)


def share(rank: int, samples: list[float], calls: int, memory_mb: float, images_per_call: int = 2) -> Share:
    measurement = timing.Measurement(first_call_s=1.0, samples=samples, memory={"peak_rss_mb": memory_mb},
                                     started=100.0 + rank, finished=110.0 + rank)
    stages = Stages(total_s=0.5, text_encode_s=0.1, denoise_s=0.3, decode_s=0.05, per_step_s=[0.15, 0.15],
                    unet_batch_sizes=[2, 2], unet_calls=2)
    return Share(rank, "host", "cpu", calls, 2.0, calls * images_per_call, [], True, measurement, stages)


def test_build_record_merges_every_rank_without_touching_files():
    context = RecordContext({"model": "embedded"}, {"device": "cpu"}, world_size=2)
    task = Task("flash-lcm", 2, 0.0, False, "", "flash")
    shares = [share(0, [0.2, 0.4], calls=2, memory_mb=300.0), share(1, [0.6, 0.8], calls=2, memory_mb=500.0)]
    record = build_record(context, task, shares, {"model": "embedded"}, [f"image_{i}.png" for i in range(8)],
                          "grid.png", [64, 64], ["a warning"], {}, [Comparison("vanilla-sd", 30, "compare.png")])
    measured = record.measured
    assert record.ok and record.world_size == 2
    assert measured.timing.images_per_call == 2  # 8 images over 4 calls
    assert measured.timing.seconds_per_call.median == pytest.approx(0.5)
    assert measured.timing.seconds_per_image == pytest.approx(0.25)
    assert measured.timing.aggregate_images_per_s == pytest.approx(8 / 11)  # 4 calls x 2 images, over 100-111 s
    assert measured.memory.peak_rss_mb == 500.0  # the largest rank's
    assert measured.unet.evaluations_per_image == 2.0  # CFG batches of 2 over 2 images per call
    assert [rank.seconds_per_image for rank in measured.ranks] == [pytest.approx(0.15), pytest.approx(0.35)]


def test_run_writer_owns_the_files_and_appends_each_record_whole(tmp_path):
    writer = RunWriter(tmp_path)
    task = Task("flash-lcm", 2, 0.0, False, "", "flash")
    writer.make_folders([task])
    writer.save_images([Image.new("RGB", (8, 8), "red")], ["image.png"])
    context = RecordContext({"model": "embedded", "prompts": ["a"]}, {"device": "cpu"}, world_size=1)
    record = build_record(context, task, [share(0, [0.1], calls=1, memory_mb=1.0, images_per_call=1)], {},
                          ["image.png"], "grid.png", [8, 8], [], {}, [])
    writer.add(record)
    writer.add(context.failed(Task("flash-lcm", 4, 0.0, False, "", "flash"), "boom"))
    writer.write_summary()
    assert read_records(tmp_path) == writer.records
    assert {p.name for p in tmp_path.iterdir()} == {"image.png", "grid.png", "records.jsonl", "summary.md",
                                                     "latency.png"}


class Constant(Metric):
    name = "constant"
    description = "always 1, or raises on request"
    needs_reference = True

    def score(self, data: MetricInput) -> dict:
        if "raise" in data.prompts:
            raise ValueError("cannot score")
        return {"value": 1.0, "n": len(data.images), "references": list(data.references)}


def batch(indices, prompt="p"):
    return MetricInput([Image.new("RGB", (8, 8), (index, 0, 0)) for index in indices], [prompt] * len(indices),
                       indices=indices)


def test_scoring_names_the_reference_and_turns_a_failure_into_a_record_entry():
    warnings: list[str] = []
    scoring = Scoring({"constant": Constant(None)}, None, warnings.append, lambda name: None)
    baseline = Task("vanilla-sd", 30, 7.5, True, "baseline", "baseline")
    few = Task("flash-lcm", 2, 0.0, False, "", "flash")
    scoring.start(baseline, first_baseline=True, run_has_baseline=True)
    scoring.update(batch([0, 1]), baseline)
    assert scoring.finish(baseline, [], succeeded=True) == {
        "constant": {"skipped": "this measurement is the reference"}}
    scoring.commit_reference(baseline)  # once the baseline's record is written
    scoring.start(few, first_baseline=False, run_has_baseline=True)
    scoring.update(batch([1, 0]), few)  # the references arrive aligned with the images, by index
    result = scoring.finish(few, [], succeeded=True)["constant"]
    assert result["reference"] == "vanilla-sd 30 steps" and result["n"] == 2 and result["higher_is_better"]
    assert [image.getpixel((0, 0))[0] for image in result["references"]] == [0, 1]
    scoring.start(few, first_baseline=False, run_has_baseline=True)
    scoring.update(batch([0], "raise"), few)
    assert scoring.finish(few, [], succeeded=True) == {"constant": {"error": "ValueError: cannot score"}}
    assert warnings == ["metric constant on flash-lcm 2 steps: ValueError: cannot score"]
    scoring.start(few, first_baseline=False, run_has_baseline=False)
    assert scoring.finish(few, [], succeeded=True) == {
        "constant": {"skipped": "no baseline in this run to compare with: add --compare_baseline"}}
    scoring.close()


def test_a_failed_baseline_leaves_its_comparisons_skipped_not_wrong():
    scoring = Scoring({"constant": Constant(None)}, None, lambda _: None, lambda name: None)
    baseline = Task("vanilla-sd", 30, 7.5, True, "baseline", "baseline")
    few = Task("flash-lcm", 2, 0.0, False, "", "flash")
    scoring.start(baseline, first_baseline=True, run_has_baseline=True)
    scoring.update(batch([0]), baseline)
    scoring.finish(baseline, [], succeeded=False)
    scoring.start(few, first_baseline=False, run_has_baseline=True)
    scoring.update(batch([0]), few)
    assert scoring.finish(few, [], succeeded=True) == {
        "constant": {"skipped": "the baseline to compare with failed; see its record"}}
    scoring.close()
