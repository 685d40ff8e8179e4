"""harness compare: matching two runs' measurements, the table, and the --fail-above verdict."""

import json

import pytest

from harness.records.store import append_record
from harness.reporting.compare import compare_runs
from tests.conftest import invoke, make_record


def write_run(folder, records):
    folder.mkdir()
    (folder / "records.jsonl").touch()
    for record in records:
        append_record(folder / "records.jsonl", record)
    return folder


def run_records(scale=1.0):
    return [make_record("vanilla-sd", 30, 2.0 * scale, baseline=True, guidance_scale=7.5),
            make_record("flash-lcm", 2, 0.1 * scale), make_record("flash-lcm", 4, 0.2 * scale)]


def table_row(output, *cells):
    """The markdown row that starts with these cells, split into stripped cells."""
    for line in output.splitlines():
        row = [cell.strip() for cell in line.strip("|").split("|")]
        if row[:len(cells)] == [str(cell) for cell in cells]:
            return row
    raise AssertionError(f"no row starting with {cells} in:\n{output}")


def test_equal_runs_have_ratio_one_and_pass(tmp_path):
    a = write_run(tmp_path / "a", run_records())
    b = write_run(tmp_path / "b", run_records())
    result = invoke("compare", a, b / "records.jsonl", "--fail-above", 0, "--json")
    assert result.exit_code == 0, result.output
    matched = json.loads(result.output)["matched"]
    assert [(m["sampler"], m["steps"]) for m in matched] == [("vanilla-sd", 30), ("flash-lcm", 2), ("flash-lcm", 4)]
    assert [m["ratio"] for m in matched] == [1.0, 1.0, 1.0]


def test_table_shows_both_medians_the_ratio_and_the_change(tmp_path):
    a = write_run(tmp_path / "a", run_records())
    b = write_run(tmp_path / "b", run_records(scale=1.2))
    result = invoke("compare", a, b)
    assert result.exit_code == 0
    assert table_row(result.output, "flash-lcm", 2) == ["flash-lcm", "2", "0", "64x64", "1", "0.1", "0.12",
                                                        "1.200", "+20.0%"]


@pytest.mark.parametrize("fail_above, exit_code", [(10, 1), (30, 0)])
def test_fail_above_exits_1_only_beyond_the_threshold(tmp_path, fail_above, exit_code):
    a = write_run(tmp_path / "a", run_records())
    b_records = run_records()
    b_records[2] = make_record("flash-lcm", 4, 0.24)  # 20% slower, the others unchanged
    b = write_run(tmp_path / "b", b_records)
    result = invoke("compare", a, b, "--fail-above", fail_above)
    assert result.exit_code == exit_code
    if exit_code:
        assert result.output.splitlines()[-1].startswith("regression: flash-lcm 4 steps")
        assert "20.0% slower" in result.output
    else:
        assert "regression" not in result.output


def test_a_faster_b_never_fails(tmp_path):
    a = write_run(tmp_path / "a", run_records())
    b = write_run(tmp_path / "b", run_records(scale=0.5))
    assert invoke("compare", a, b, "--fail-above", 0).exit_code == 0


def test_unmatched_and_failed_measurements_are_listed(tmp_path):
    a = write_run(tmp_path / "a", run_records() + [make_record("flash-lcm", 8, 0.4)])
    b = write_run(tmp_path / "b", [
        *run_records()[:2],
        make_record("flash-lcm", 4, error="RuntimeError: out of memory"),
        make_record("flash-lcm", 2, 0.05, image_size=(128, 128)),  # other size: other work, no match
    ])
    result = invoke("compare", a, b)
    assert result.exit_code == 0
    assert table_row(result.output, "A", "flash-lcm", 4)[-1] == "not in B"
    assert table_row(result.output, "A", "flash-lcm", 8)[-1] == "not in B"
    assert table_row(result.output, "B", "flash-lcm", 4)[-1] == "failed: RuntimeError: out of memory"
    assert table_row(result.output, "B", "flash-lcm", 2, 0, "128x128")[-1] == "not in A"


def test_measurements_match_only_with_the_same_work_per_image():
    a = [make_record("flash-lcm", 4, 0.2)]
    other_work = [make_record("flash-lcm", 4, 0.2, guidance_scale=1.5),
                  make_record("flash-lcm", 4, 0.2, images_per_call=4),
                  make_record("flash-lcm", 4, 0.2, image_size=(64, 128)),
                  make_record("flash-lcm", 8, 0.2), make_record("vanilla-sd", 4, 0.2)]
    assert compare_runs(a, other_work).matched == []
    more_prompts = {"model": "embedded", "prompts": ["x", "y"], "num_images": 1, "seed": 1}
    same_work = [make_record("flash-lcm", 4, 0.3, config=more_prompts)]
    assert [match.ratio for match in compare_runs(a, same_work).matched] == [pytest.approx(1.5)]


@pytest.mark.parametrize("setup, shown", [({"dtype": "float16"}, "(float16)"),
                                           ({"device_name": "NVIDIA H100"}, "on NVIDIA H100")])
def test_different_devices_or_dtypes_warn(tmp_path, setup, shown):
    a = write_run(tmp_path / "a", run_records())
    b = write_run(tmp_path / "b", [make_record("flash-lcm", 2, **setup)])
    result = invoke("compare", a, b)
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "on x86_64 (float32)" in warnings[0] and shown in warnings[0]
    assert "warning" not in invoke("compare", a, a).output


@pytest.mark.parametrize("make_b, message", [
    (lambda tmp: tmp / "missing", "missing' does not exist; pass a run folder"),
    (lambda tmp: write_run(tmp / "empty", []), "holds no records"),
    (lambda tmp: write_run(tmp / "other", [make_record("vanilla-sd", 50, 2.0)]), "no measurement of A"),
    (lambda tmp: write_run(tmp / "twice", [make_record(), make_record()]), "measures flash-lcm 4 steps"),
])
def test_bad_input_exits_2_with_a_one_line_fix(tmp_path, make_b, message):
    a = write_run(tmp_path / "a", run_records())
    result = invoke("compare", a, make_b(tmp_path))
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_lines_that_are_not_records_are_skipped_with_a_warning(tmp_path):
    a = write_run(tmp_path / "a", run_records())
    b = write_run(tmp_path / "b", run_records())
    with open(b / "records.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"name": "not a record"}) + "\n")
    result = invoke("compare", a, b)
    assert result.exit_code == 0
    assert f"Warning: line 4 of {b / 'records.jsonl'}: schema None is not 'harness.record/1'" in result.output
    foreign = write_run(tmp_path / "foreign", [])
    (foreign / "records.jsonl").write_text(json.dumps({"name": "not a record"}) + "\n")
    result = invoke("compare", a, foreign)
    assert result.exit_code == 2 and result.output.splitlines()[-1].startswith("Error: B ")
    assert "holds no records" in result.output
