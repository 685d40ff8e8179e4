"""Records with values harness never writes are refused by the schema, naming the field, and skipped by readers.

Negative or absurd step counts and guidance scales, negative times, sizes and counts, statistics whose median lies
outside their own range, ranks beyond the run's processes: a reader would divide by them or report them as
measured. The bench options stop where the schema does, so every record harness writes passes.
"""

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import RecordError
from harness.records.schema import MAX_GUIDANCE, MAX_STEPS, Record
from tests.conftest import invoke, make_record


def _good() -> dict:
    return make_record("flash-lcm", 4, 0.2, guidance_scale=1.5).to_json()


def _failed() -> dict:
    return make_record("flash-lcm", 4, error="RuntimeError: boom").to_json()


IMPOSSIBLE = [
    (lambda r: r.update(steps=-2), "'steps' is -2; harness runs 1 to 10000 steps"),
    (lambda r: r.update(steps=0), "'steps' is 0"),
    (lambda r: r.update(steps=10**9), "'steps' is 1000000000"),
    (lambda r: r.update(guidance_scale=-7.5), "'guidance_scale' is -7.5; harness runs guidance 0 to 100"),
    (lambda r: r.update(guidance_scale=1e300), "'guidance_scale' is 1e+300"),
    (lambda r: r.update(world_size=0), "'world_size' is 0; a run has 1 process or more"),
    (lambda r: r["timing"].update(load_s=-1.0), "'timing.load_s' is -1.0"),
    (lambda r: r["timing"].update(first_call_s=-0.5), "'timing.first_call_s' is -0.5"),
    (lambda r: r["timing"].update(samples_s=[0.1, -0.1]), "'timing.samples_s[1]' is -0.1"),
    (lambda r: r["timing"]["seconds_per_call"].update(n=0), "'timing.seconds_per_call.n' is 0"),
    (lambda r: r["timing"]["seconds_per_call"].update(max=0.01), "the median lies between the smallest"),
    (lambda r: r["timing"]["seconds_per_call"].update(stdev=-1.0), "'timing.seconds_per_call.stdev' is -1.0"),
    (lambda r: r["unet"].update(calls=-3), "'unet.calls' is -3; a count is 0 or more"),
    (lambda r: r["unet"].update(batch_sizes=[0]), "'unet batch_sizes[0]' is 0"),
    (lambda r: r["unet"].update(evaluations_per_image=-1.0), "'unet.evaluations_per_image' is -1.0"),
    (lambda r: r["stages"].update(per_step_s=[0.1, -5.0]), "'stages.per_step_s[1]' is -5.0"),
    (lambda r: r["stages"].update(decode_s=-0.1), "'stages.decode_s' is -0.1"),
    (lambda r: r["stages"].update(nonfinite_images=-1), "'stages.nonfinite_images' is -1"),
    (lambda r: r["memory"].update(peak_rss_mb=-400.0), "'memory.peak_rss_mb' is -400.0"),
    (lambda r: r.update(comparisons=[{"baseline_sampler": "vanilla-sd", "baseline_steps": -30,
                                      "path": "compare.png"}]), "'comparisons[0].baseline_steps' is -30"),
    (lambda r: r.update(ranks=[{"rank": 3, "host": "h", "device": "cpu", "calls": 1, "load_s": 1.0,
                                "first_call_s": 0.1, "seconds_per_image": 0.1, "measured_s": 0.1,
                                "memory": {}}]), "'ranks[0].rank' is 3; a rank is 0 to world_size - 1"),
]


@pytest.mark.parametrize("change, message", IMPOSSIBLE)
def test_an_impossible_value_is_refused_naming_its_field(change, message):
    data = _good()
    change(data)
    with pytest.raises(RecordError) as raised:
        Record.from_json(data)
    assert str(raised.value).startswith(message) or message in str(raised.value)


@pytest.mark.parametrize("field, value", [("steps", -1), ("guidance_scale", -1.0), ("steps", MAX_STEPS + 1),
                                          ("guidance_scale", MAX_GUIDANCE * 2), ("world_size", -4)])
def test_a_failed_record_with_impossible_values_is_refused_too(field, value):
    data = _failed()
    data[field] = value
    with pytest.raises(RecordError, match=f"'{field}' is"):
        Record.from_json(data)


@pytest.mark.parametrize("field, value", [("steps", 1), ("steps", MAX_STEPS), ("guidance_scale", 0.0),
                                          ("guidance_scale", MAX_GUIDANCE)])
def test_the_edges_of_what_harness_writes_are_accepted(field, value):
    data = _good()
    data[field] = value
    assert getattr(Record.from_json(data), field) == value


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_STEPS), st.floats(min_value=0, max_value=MAX_GUIDANCE),
       st.lists(st.floats(min_value=1e-6, max_value=1e4), min_size=1, max_size=6))
def test_every_record_harness_can_write_reads_back(steps, guidance, samples):
    from harness.records.stats import Stats

    record = make_record("flash-lcm", steps, 0.1, guidance_scale=guidance)
    stats = Stats.from_samples(samples)
    timing = record.measured.timing
    timing = dataclasses.replace(timing, seconds_per_call=stats, samples_s=samples)
    record = dataclasses.replace(record, measured=dataclasses.replace(record.measured, timing=timing))
    assert Record.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_report_skips_an_impossible_record_with_a_warning_and_reports_the_rest(tmp_path):
    good, bad = _good(), _good()
    bad["steps"] = -4
    (tmp_path / "records.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "image_s4_i0_seed42.png")
    result = invoke("report", tmp_path)
    assert result.exit_code == 0, result.output
    assert (f"Warning: line 2 of {tmp_path / 'records.jsonl'}: 'steps' is -4; harness runs 1 to 10000 steps; "
            "skipped") in result.output
    summary = (tmp_path / "summary.md").read_text()
    assert "| flash-lcm |       4 |" in summary and "-4" not in summary


@pytest.mark.parametrize("option, value", [("--steps", str(MAX_STEPS + 1)), ("--baseline_steps", "20000"),
                                           ("--baseline_guidance", "1e6"), ("--baseline_guidance", "-1")])
def test_bench_refuses_what_the_schema_would(option, value):
    result = invoke("bench", option, value, "--dry-run")
    assert result.exit_code == 2 and "Invalid value for" in result.output
