"""Full disks and failed writes: every file lands whole or fails in one line with a non-zero exit.

Records are appended whole (a failed append is cut back to the last whole line); summary.md and the plots are
never claimed when they were not written; a grid that cannot be written keeps its finished measurement; the
errors name the file asked for, never a temporary one. Full disks are simulated with OSError(ENOSPC).
"""

import errno
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.records import files, store
from harness.records.store import append_record, read_records
from harness.reporting import grids, plots, report
from tests.conftest import invoke, make_record, record_json

FAST = ("--steps", "2", "--warmup", "0", "--repeats", "1", "--quiet")
FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def _hidden(folder) -> list[str]:
    return [path.name for path in folder.rglob(".*")]


# ----- records.jsonl: appended whole or not at all -----

@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0, max_value=1, exclude_max=True), st.sampled_from(["write", "fsync"]))
def test_an_append_that_fails_part_way_leaves_only_whole_lines(tmp_path_factory, fraction, where):
    path = tmp_path_factory.mktemp("records") / store.RECORDS_FILE
    append_record(path, make_record(steps=2))
    before = path.read_bytes()
    real_write = os.write

    def write_part(fd, data):
        cut = int(len(data) * fraction)  # the disk fills up after this many bytes of the line
        if cut:
            real_write(fd, bytes(data[:cut]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def no_fsync(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    patch = pytest.MonkeyPatch()
    patch.setattr(store.os, "write" if where == "write" else "fsync", write_part if where == "write" else no_fsync)
    try:
        with pytest.raises(OSError):
            append_record(path, make_record(steps=4))
    finally:
        patch.undo()
    assert path.read_bytes() == before
    assert [record.steps for record in read_records(path)] == [2]
    append_record(path, make_record(steps=8))  # room again: the next record is whole
    assert [record.steps for record in read_records(path)] == [2, 8]


def test_a_line_torn_by_a_crash_never_swallows_the_next_record(tmp_path):
    path = tmp_path / store.RECORDS_FILE
    append_record(path, make_record(steps=2))
    with open(path, "ab") as handle:
        handle.write(b'{"schema": 3, "sampler": "flash-l')  # kill -9 mid-line (an older harness, another tool)
    append_record(path, make_record(steps=4))
    skipped = []
    assert [record.steps for record in read_records(path, on_skip=skipped.append)] == [2, 4]
    assert len(skipped) == 1 and skipped[0].startswith(f"line 2 of {path}: not JSON")


# ----- the errors of atomic writes name the file asked for -----

def test_atomic_writes_name_the_file_asked_for_not_the_temporary_one(tmp_path):
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(IsADirectoryError) as raised:
        files.write_text_atomic(tmp_path / "grid.png", "x")
    assert raised.value.filename == str(tmp_path / "grid.png")
    with pytest.raises(FileNotFoundError) as raised:
        files.write_text_atomic(tmp_path / "gone" / "summary.md", "x")
    assert raised.value.filename == str(tmp_path / "gone" / "summary.md")
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("error", [FULL, OSError(errno.EDQUOT, "Disk quota exceeded"),
                                   RuntimeError("Error while serializing: I/O error: No space left on device "
                                                "(os error 28)")])
def test_a_full_disk_is_recognised_whatever_reports_it(error):
    assert files.disk_full(error) in ("No space left on device", "Disk quota exceeded")


def test_other_errors_are_not_a_full_disk():
    assert files.disk_full(OSError(errno.EACCES, "Permission denied")) is None
    assert files.disk_full(ValueError("28 images")) is None


# ----- bench: the last line claims only what was written -----

def test_bench_says_so_when_summary_md_cannot_be_written(tmp_path, monkeypatch, embedded_model):
    real = report.write_text_atomic

    def refuse_summary(path, text):
        if path.name == store.SUMMARY_FILE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    monkeypatch.setattr(report, "write_text_atomic", refuse_summary)
    outdir = tmp_path / "run"
    result = invoke("bench", "--outdir", outdir, *FAST)
    assert result.exit_code == 1, result.output
    assert _errors(result.output) == [
        f"Error: cannot write 'summary.md' in '{outdir}': No space left on device; free some space or make the "
        f"folder writable, then `harness report {outdir}` writes them from records.jsonl."]
    assert f"records, images and summary.md in {outdir}" not in result.output
    assert f"records and images in {outdir}" in result.output
    assert not (outdir / "summary.md").exists()
    assert [record["status"] for record in record_json(outdir)] == ["ok"]


def test_bench_says_so_when_the_latency_plot_cannot_be_written(tmp_path, monkeypatch, embedded_model):
    real = plots.atomic_path

    def refuse_plot(path):
        if path.name == plots.LATENCY_PLOT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path)

    monkeypatch.setattr(plots, "atomic_path", refuse_plot)
    outdir = tmp_path / "run"
    result = invoke("bench", "--outdir", outdir, *FAST)
    assert result.exit_code == 1, result.output
    assert _errors(result.output) == [
        f"Error: cannot write 'latency.png' in '{outdir}': No space left on device; free some space or make the "
        f"folder writable, then `harness report {outdir}` writes them from records.jsonl."]
    summary = (outdir / "summary.md").read_text()
    assert "latency.png" not in summary and "| flash-lcm" in summary  # written, and it links no missing plot
    assert f"records, images and summary.md in {outdir}" in result.output


def test_report_fails_in_one_line_when_summary_md_cannot_be_written(tmp_path, monkeypatch, embedded_model):
    outdir = tmp_path / "run"
    assert invoke("bench", "--outdir", outdir, *FAST).exit_code == 0
    before = (outdir / "summary.md").read_bytes()

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "write_text_atomic", full)
    result = invoke("report", outdir)
    assert result.exit_code == 2
    assert _errors(result.output) == [f"Error: cannot write 'summary.md' in '{outdir}': No space left on device; "
                                      "free some space or make the run folder writable."]
    assert (outdir / "summary.md").read_bytes() == before


# ----- grids: written before their record, never at the cost of it -----

def test_a_grid_that_cannot_be_written_keeps_the_finished_measurement(tmp_path, embedded_model):
    outdir = tmp_path / "run"
    (outdir / "grid_s2.png").mkdir(parents=True)  # something in the grid's place that a rename cannot replace
    result = invoke("bench", "--outdir", outdir, *FAST)
    assert result.exit_code == 1, result.output
    [error] = _errors(result.output)
    assert error.startswith("Error: the grids of flash-lcm (2 steps) were not written: 'grid_s2.png': Is a directory;")
    assert ".grid" not in result.output and "Traceback" not in result.output  # no temporary name, no raw error
    [record] = record_json(outdir)
    assert record["status"] == "ok" and record["timing"]["seconds_per_image"] > 0
    assert any("'grid_s2.png': Is a directory" in warning for warning in record["warnings"])
    assert _hidden(outdir) == []


def test_a_full_disk_while_writing_a_grid_keeps_its_record_and_stops_in_one_line(tmp_path, monkeypatch,
                                                                                  embedded_model):
    real = grids.save_image_atomic

    def full_at_grids(image, path):
        if path.name.startswith("grid"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(image, path)

    monkeypatch.setattr(grids, "save_image_atomic", full_at_grids)
    outdir = tmp_path / "run"
    result = invoke("bench", "--outdir", outdir, "--steps", "2", "4", *FAST[2:])
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: cannot write results to '{outdir}': No space left on device; free some space or pass --outdir on "
        f"another disk. The 1 finished measurement(s) are in {outdir / 'records.jsonl'}."]
    [record] = record_json(outdir)
    assert record["steps"] == 2 and record["status"] == "ok"


def test_a_missing_grid_folder_is_named_by_its_real_name(tmp_path):
    from PIL import Image

    record = make_record(steps=2, grid="gone/grid_s2.png", images=["image_s2_i0.png"])
    Image.new("RGB", (8, 8)).save(tmp_path / "image_s2_i0.png")
    with pytest.raises(FileNotFoundError) as raised:
        grids.write_grids(tmp_path, record, [])
    assert raised.value.filename == str(tmp_path / "gone" / "grid_s2.png")
    warnings = []
    append_record(tmp_path / store.RECORDS_FILE, record)
    report.rebuild(tmp_path, on_warning=warnings.append)
    assert warnings == ["cannot rebuild the grids of flash-lcm (2 steps): cannot write grid 'gone/grid_s2.png': its "
                        "folder 'gone' does not exist; the grid files already there are kept."]
    assert _hidden(tmp_path) == []
