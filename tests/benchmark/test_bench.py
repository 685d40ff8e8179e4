"""`harness bench` end to end on the embedded model: files, records, UNet counts, tables, grids."""

import json
import shutil

import pytest
from PIL import Image

from harness.records.schema import Record
from harness.reporting import report
from tests.conftest import invoke, record_json

FAST = ("--warmup", "0", "--repeats", "2", "--quiet")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, embedded_model):
    """The issue's done-when command: flash-lcm at 2/4/8 with --seed 42 and --compare_baseline."""
    outdir = tmp_path_factory.mktemp("bench") / "run"
    result = invoke("bench", "--sampler", "flash-lcm", "--steps", "2", "4", "8", "--seed", "42",
                    "--compare_baseline", "--outdir", outdir, *FAST)
    assert result.exit_code == 0, result.output
    return outdir, result.output


def by_key(records):
    return {(r["sampler"], r["steps"]): r for r in records}


@pytest.mark.slow
def test_seed_file_names(compare_run):
    outdir, _ = compare_run
    expected = {
        "image_s2_i0_seed42.png", "image_s4_i0_seed42.png", "image_s8_i0_seed42.png",
        "grid_s2_seed42.png", "grid_s4_seed42.png", "grid_s8_seed42.png",
        "compare_baseline30_flash2_seed42.png", "compare_baseline30_flash4_seed42.png",
        "compare_baseline30_flash8_seed42.png", "records.jsonl", "summary.md", "latency.png", "baseline",
        "prompts.json",
    }
    assert {p.name for p in outdir.iterdir()} == expected
    assert {p.name for p in (outdir / "baseline").iterdir()} == {
        "baseline_s30_i0_seed42.png", "grid_baseline_s30_seed42.png"}


@pytest.mark.slow
def test_one_record_per_measurement_with_documented_fields(compare_run):
    outdir, _ = compare_run
    records = record_json(outdir)
    assert [(r["sampler"], r["steps"]) for r in records] == [
        ("vanilla-sd", 30), ("flash-lcm", 2), ("flash-lcm", 4), ("flash-lcm", 8)]
    for record in records:
        assert record["schema"] == "harness.record/1"
        assert record["status"] == "ok"
        assert record["config"]["seed"] == 42 and record["config"]["model"] == "embedded"
        assert {"torch", "diffusers", "peft", "device", "dtype", "git_commit"} <= set(record["environment"])
        timing = record["timing"]
        assert set(timing["seconds_per_call"]) == {"n", "min", "max", "mean", "median", "stdev", "p90", "iqr"}
        assert timing["seconds_per_call"]["n"] == 2 == len(timing["samples_s"])
        assert timing["seconds_per_image"] == pytest.approx(timing["seconds_per_call"]["median"])
        assert timing["images_per_s"] == pytest.approx(1 / timing["seconds_per_image"])
        assert timing["first_call_s"] > 0 and timing["load_s"] > 0
        assert record["memory"]["peak_rss_mb"] > 100
        assert record["deterministic"] is True
        assert record["image_size"] == [64, 64]
        assert all((outdir / name).is_file() for name in record["images"] + [record["grid"]])
    flash = by_key(records)[("flash-lcm", 4)]
    assert flash["sampler_info"]["scheduler"] == "LCMScheduler (trailing)"
    assert flash["sampler_info"]["lora"]
    assert flash["guidance_scale"] == 0
    assert flash["comparisons"] == [{"baseline_sampler": "vanilla-sd", "baseline_steps": 30,
                                     "path": "compare_baseline30_flash4_seed42.png"}]
    baseline = by_key(records)[("vanilla-sd", 30)]
    assert (
        baseline["sampler_info"]["scheduler"] == "DDIMScheduler (trailing)" and baseline["sampler_info"]["lora"] is None
    )


@pytest.mark.slow
def test_unet_evaluations_are_counted_honestly(compare_run, embedded_model):
    from diffusers import DDIMScheduler

    records = by_key(record_json(compare_run[0]))
    for steps in (2, 4, 8):  # LCM without CFG: one UNet call of batch 1 per step
        unet = records[("flash-lcm", steps)]["unet"]
        assert unet == {"calls": steps, "batch_sizes": [1], "evaluations": steps, "evaluations_per_image": steps}
        assert len(records[("flash-lcm", steps)]["stages"]["per_step_s"]) == steps
    # The embedded model's own scheduler (DDIM) makes one call per timestep it sets; classifier-free
    # guidance makes every call a batch of 2. (SD 1.5's PNDM would make 31 calls for 30 steps.)
    ddim = DDIMScheduler.from_pretrained(embedded_model, subfolder="scheduler")
    ddim.set_timesteps(30)
    unet = records[("vanilla-sd", 30)]["unet"]
    assert unet["calls"] == len(ddim.timesteps) == 30
    assert unet["batch_sizes"] == [2] and unet["evaluations_per_image"] == 60


@pytest.mark.slow
def test_stage_breakdown_adds_up(compare_run):
    for record in record_json(compare_run[0]):
        stages = record["stages"]
        parts = stages["text_encode_s"] + stages["denoise_s"] + stages["decode_s"]
        assert 0 < parts <= stages["total_s"]
        assert sum(stages["per_step_s"]) == pytest.approx(stages["denoise_s"], rel=1e-6)


@pytest.mark.slow
def test_summary_table_is_written_and_printed(compare_run):
    outdir, output = compare_run
    summary = (outdir / "summary.md").read_text()
    assert "| sampler" in summary and "| flash-lcm" in summary and "| vanilla-sd" in summary
    timing_table = summary.split("## Stages")[0]
    table_lines = [line for line in timing_table.splitlines() if line.startswith("| flash-lcm")]
    assert len(table_lines) == 3
    records = by_key(record_json(outdir))
    baseline = records[("vanilla-sd", 30)]
    for line, steps in zip(table_lines, (2, 4, 8)):  # measured and ideal speedup over the baseline
        measured, ideal = (float(cell.strip().rstrip("x")) for cell in line.strip(" |").split("|")[-2:])
        record = records[("flash-lcm", steps)]
        expected = baseline["timing"]["seconds_per_image"] / record["timing"]["seconds_per_image"]
        assert measured == pytest.approx(expected, abs=0.006)
        typed, typed_baseline = Record.from_json(record).measured, Record.from_json(baseline).measured
        assert ideal == pytest.approx(report.ideal_speedup(typed, typed_baseline), abs=0.006)
        assert ideal > 1  # fewer UNet evaluations than the baseline's 62, whatever the machine's load
    assert "text encode ms" in summary.split("## Stages")[1]
    assert "](latency.png)" in summary
    assert "| flash-lcm" in output


@pytest.mark.slow
def test_comparison_grid_has_baseline_and_few_step_rows(compare_run):
    outdir, _ = compare_run
    grid = Image.open(outdir / "compare_baseline30_flash2_seed42.png")
    single = Image.open(outdir / "grid_s2_seed42.png")
    assert grid.height > 2 * single.height  # two rows of tiles plus labels


@pytest.mark.slow
def test_report_rebuilds_summary_and_grids_from_records(compare_run):
    outdir, _ = compare_run
    generated = [
        "summary.md",
        "latency.png",
        "grid_s4_seed42.png",
        "compare_baseline30_flash4_seed42.png",
        "baseline/grid_baseline_s30_seed42.png",
    ]
    before = {name: (outdir / name).read_bytes() for name in generated}
    for name in generated:
        (outdir / name).unlink()
    result = invoke("report", outdir)
    assert result.exit_code == 0, result.output
    assert {name: (outdir / name).read_bytes() for name in generated} == before


def test_same_seed_same_pixels_other_seed_other_pixels(embedded_model):
    import torch

    from harness.benchmark.sampler import GenerationRequest, SamplerConfig
    from harness.hooks.registry import get_registry
    from harness.models import loading as models

    config = SamplerConfig(models.resolve_model("embedded"), torch.device("cpu"), torch.float32)
    sampler = get_registry().sampler("flash-lcm").cls(config)
    sampler.load()
    request = GenerationRequest("a red circle", 2, 0.0, (7, 8))
    first, second = sampler.generate(request), sampler.generate(request)
    assert [i.tobytes() for i in first] == [i.tobytes() for i in second]
    assert first[0].tobytes() != first[1].tobytes()
    other = sampler.generate(GenerationRequest("a red circle", 2, 0.0, (9, 8)))
    assert other[0].tobytes() != first[0].tobytes() and other[1].tobytes() == first[1].tobytes()


def test_several_images_prompts_no_seed_and_json(tmp_path, embedded_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n", encoding="utf-8")
    outdir = tmp_path / "run"
    result = invoke(
        "bench", "--steps", "2", "--num-images", "2", "--prompts", prompts, "--outdir", outdir, "--json", *FAST
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    record = record_json(outdir)[0]
    assert printed == [record]
    # Without --seed the names carry no seed; idx counts over prompts x images.
    assert record["images"] == [f"image_s2_i{i}.png" for i in range(4)]
    assert record["grid"] == "grid_s2.png"
    assert record["unet"]["batch_sizes"] == [2] and record["unet"]["evaluations_per_image"] == 2
    assert record["timing"]["seconds_per_call"]["n"] == 4  # 2 passes x 2 prompts
    assert isinstance(record["config"]["seed"], int)  # drawn and recorded, so the run can be repeated


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten_by_accident(compare_run):
    outdir, _ = compare_run
    before = (outdir / "records.jsonl").read_bytes()
    result = invoke("bench", "--steps", "2", "--outdir", outdir, *FAST)
    assert result.exit_code == 2
    assert "already holds a run (records.jsonl); pass a new --outdir or add --overwrite" in result.output
    assert (outdir / "records.jsonl").read_bytes() == before


def test_undistilled_is_the_base_model_on_the_few_step_schedule(tmp_path, embedded_model):
    result = invoke(
        "bench", "--sampler", "undistilled", "--steps", "2", "--outdir", tmp_path / "run", "--seed", "0", *FAST
    )
    assert result.exit_code == 0, result.output
    (record,) = record_json(tmp_path / "run")
    assert record["sampler_info"]["scheduler"] == "LCMScheduler (trailing)"
    assert record["sampler_info"]["lora"] is None and record["guidance_scale"] == 0
    assert record["unet"]["evaluations_per_image"] == 2


def test_lora_id_with_lora_path_gives_flash_lcm_and_local_student_one_lora_each(tmp_path, embedded_model):
    from harness.models.embedded import embedded_lora

    other = tmp_path / "other"
    shutil.copytree(embedded_lora(), other)
    result = invoke(
        "bench",
        "--sampler",
        "flash-lcm",
        "local-student",
        "--steps",
        "2",
        "--lora_id",
        embedded_lora(),
        "--lora_path",
        other,
        "--outdir",
        tmp_path / "run",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    loras = {record["sampler"]: record["sampler_info"]["lora"] for record in record_json(tmp_path / "run")}
    assert loras == {"flash-lcm": str(embedded_lora()), "local-student": str(other)}
