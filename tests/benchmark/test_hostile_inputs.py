"""Hostile files, paths, concurrency and arguments, as a careless user or an attacker would try them.

Each test is one category of issue 14: what harness reads is checked, nothing outside the run folder is
read or written, an earlier run survives until its replacement works, one run per folder, arguments are
refused before anything loads. Training-side cases are in test_hostile_inputs_training.py, numeric
faults, launchers, resources and interrupts in test_hostile_inputs_runs.py.
"""

import json
import os
import stat
from pathlib import Path

import pytest

from harness.records.rundir import LOCK_FILE, FolderLock
from harness.records.store import append_record
from tests.conftest import invoke, make_record

FAST = ("--model", "embedded", "--warmup", "0", "--repeats", "1", "--quiet", "--seed", "0")


def write_run(folder: Path, *records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for record in records or (make_record("vanilla-sd", 30, 1.0, baseline=True, guidance_scale=7.5),
                              make_record("flash-lcm", 2, 0.1)):
        append_record(folder / "records.jsonl", record)
    return folder


# ----- readers: a bad line is named and skipped; nothing good is replaced by nothing -----

@pytest.mark.parametrize("content", [b"", b"\n\n", b'{"torn": ', b"\xff\xfe\x00", b'{"schema": "other/1"}\n', b"[]\n"])
def test_report_of_an_empty_or_torn_run_refuses_and_keeps_the_summary(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_bytes(content)
    (run / "summary.md").write_text("the good summary\n")
    result = invoke("report", run)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith(f"Error: '{run / 'records.jsonl'}' holds no record (")
    assert "Traceback" not in result.output
    assert (run / "summary.md").read_text() == "the good summary\n"


def test_report_skips_lines_that_are_not_records_with_a_warning(tmp_path):
    run = write_run(tmp_path / "run")
    with open(run / "records.jsonl", "ab") as handle:
        handle.write(b'{"schema": "harness.record/1", "status": "ok", "sampler": 3}\n')
    result = invoke("report", run)
    assert result.exit_code == 0
    assert f"Warning: line 3 of {run / 'records.jsonl'}: 'sampler' should be text, not 3; skipped" in result.output


@pytest.mark.parametrize("median", [0, "fast", None])
def test_compare_with_a_zero_or_non_numeric_median_names_the_line(tmp_path, median):
    good = write_run(tmp_path / "a")
    bad = write_run(tmp_path / "b")
    lines = (bad / "records.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["timing"]["seconds_per_call"]["median"] = median
    (bad / "records.jsonl").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    result = invoke("compare", good, bad)
    assert "Traceback" not in result.output
    assert f"Warning: line 2 of {bad / 'records.jsonl'}: 'timing.seconds_per_call.median'" in result.output


# ----- containment: records name files inside the run folder; nothing outside is read or written -----

@pytest.mark.parametrize("field, name", [("grid", "{outside}"), ("grid", "../victim.png"),
                                         ("images", "../victim.png"), ("comparisons", "{outside}")])
def test_report_never_touches_a_file_outside_the_run(tmp_path, field, name):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    name = name.format(outside=victim)
    record = make_record("flash-lcm", 2, 0.1, images=["image.png"], grid="grid.png",
                         comparisons=[("vanilla-sd", 30, "compare.png")]).to_json()
    if field == "comparisons":
        record["comparisons"][0]["path"] = name
    else:
        record[field] = [name] if field == "images" else name
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text(json.dumps(record) + "\n")
    result = invoke("report", run, "--html")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "lies outside the run folder" in result.output
    assert victim.read_bytes() == b"precious"


def test_a_symlink_out_of_the_run_folder_is_not_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    run = write_run(tmp_path / "run", make_record("flash-lcm", 2, 0.1, grid="link/grid.png"))
    (run / "link").symlink_to(outside, target_is_directory=True)
    result = invoke("report", run)
    assert "'link/grid.png' lies outside the run folder" in result.output
    assert list(outside.iterdir()) == []


def test_a_dangling_records_link_is_never_written_through(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    outdir.mkdir()
    target = tmp_path / "outside.jsonl"
    (outdir / "records.jsonl").symlink_to(target)
    refused = invoke("bench", "--outdir", outdir, "--steps", "1", *FAST)
    assert refused.exit_code == 2 and "already holds a run (records.jsonl)" in refused.output
    replaced = invoke("bench", "--outdir", outdir, "--steps", "1", "--overwrite", *FAST)
    assert replaced.exit_code == 0, replaced.output
    assert not target.exists()
    assert not (outdir / "records.jsonl").is_symlink() and len((outdir / "records.jsonl").read_text().splitlines()) == 1


def test_output_files_get_the_permissions_the_umask_gives(tmp_path, embedded_model):
    previous = os.umask(0o022)
    try:
        result = invoke("bench", "--outdir", tmp_path / "run", "--steps", "1", *FAST)
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    for name in ("records.jsonl", "summary.md", "latency.png", "image_s1_i0_seed0.png", "grid_s1_seed0.png"):
        assert stat.S_IMODE((tmp_path / "run" / name).stat().st_mode) == 0o644, name


# ----- nothing destroyed before its replacement works; one run per folder -----

def test_overwrite_keeps_the_earlier_run_when_the_new_one_never_loads(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    assert invoke("bench", "--outdir", outdir, "--steps", "1", *FAST).exit_code == 0
    before = {path.name: path.read_bytes() for path in outdir.iterdir() if path.is_file()}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    result = invoke("bench", "--outdir", outdir, "--steps", "1", "--overwrite", "--lora_path", broken, *FAST)
    assert result.exit_code == 1
    assert f"The earlier run in '{outdir}' was kept: no sampler of the new run loaded." in result.output
    assert {path.name: path.read_bytes() for path in outdir.iterdir() if path.is_file()} == before


def test_overwrite_replaces_the_earlier_run_once_the_new_one_loads(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    assert invoke("bench", "--outdir", outdir, "--steps", "1", *FAST).exit_code == 0
    result = invoke("bench", "--outdir", outdir, "--steps", "2", "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    names = {path.name for path in outdir.iterdir()}
    assert "image_s2_i0_seed0.png" in names and "image_s1_i0_seed0.png" not in names
    assert not any(name.startswith(".") for name in names)  # no lock, no aside copy left behind


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    with FolderLock(outdir, "--outdir"):
        result = invoke("bench", "--outdir", outdir, "--steps", "1", *FAST)
        assert (outdir / LOCK_FILE).is_file()
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: '{outdir}' is in use by another harness run (process {os.getpid()} on ")
    assert result.output.rstrip().endswith("wait for it to end or pass another --outdir.")
    assert not (outdir / "records.jsonl").exists()


# ----- arguments are refused before anything loads -----

SEED_RANGE = "is not in the range 0<=x<=18446744073709551615"


@pytest.mark.parametrize("args, message", [
    (("--seed", str(2**64)), f"Invalid value for '--seed': 18446744073709551616 {SEED_RANGE}"),
    (("--seed", "-1"), f"Invalid value for '--seed': -1 {SEED_RANGE}"),
    (("--seed", str(2**64 - 1), "--num_images", "2"), "--seed 18446744073709551615 is too large"),
    (("--height", "100"), "--height 100 is not a multiple of 8"),
    (("--sampler", "nope"), "unknown sampler 'nope'"),
])
def test_bad_arguments_fail_before_any_model_loads(tmp_path, monkeypatch, args, message):
    from harness.models import loading as models

    def no_loading(*_args, **_kwargs):
        raise AssertionError("a model was loaded for a bad argument")

    monkeypatch.setattr(models, "load_pipeline", no_loading)
    result = invoke("bench", "--outdir", tmp_path / "run", *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
