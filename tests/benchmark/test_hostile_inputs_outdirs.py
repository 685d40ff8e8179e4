"""Hostile output folders of ``harness bench``: an --outdir that is a user's project folder, a --baseline_outdir
that another run's records describe, that another run is writing, or that cannot be a folder.

Harness answers with one line (``Error: ...``) and exit code 2 before anything is written, and an --overwrite
run replaces only the files a run writes: nothing else in the folder is lost.
"""

import os

import pytest

from harness.records.rundir import FolderLock
from tests.conftest import invoke, record_json

FAST = ("--model", "embedded", "--warmup", "0", "--repeats", "1", "--quiet", "--seed", "0")
BASELINE = ("--compare_baseline", "--baseline_steps", "1", "--steps", "1")


def contents(folder) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_overwrite_in_a_project_folder_replaces_only_the_runs_files(tmp_path, monkeypatch, embedded_model):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("important")
    (project / "src" / "main.py").write_text("print(1)")
    monkeypatch.chdir(project)
    assert invoke("bench", "--outdir", ".", "--steps", "1", *FAST).exit_code == 0
    earlier = contents(project)

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    kept = invoke("bench", "--outdir", ".", "--steps", "2", "--overwrite", "--lora_path", broken, *FAST)
    assert kept.exit_code == 1
    assert contents(project) == earlier  # the earlier run is put back, the user's files never moved

    replaced = invoke("bench", "--outdir", ".", "--steps", "2", "--overwrite", *FAST)
    assert replaced.exit_code == 0, replaced.output
    assert (project / "notes.txt").read_text() == "important"
    assert (project / "src" / "main.py").read_text() == "print(1)"
    names = {path.name for path in project.iterdir()}
    assert "image_s2_i0_seed0.png" in names and "image_s1_i0_seed0.png" not in names
    assert not any(name.startswith(".") for name in names)  # no lock, no aside copy left behind


@pytest.fixture
def earlier_run(tmp_path, embedded_model):
    """A run with its baseline in the default OUTDIR/baseline."""
    outdir = tmp_path / "r0"
    result = invoke("bench", "--outdir", outdir, *BASELINE, *FAST)
    assert result.exit_code == 0, result.output
    return outdir


def test_another_runs_baseline_images_are_replaced_only_with_overwrite(tmp_path, earlier_run):
    shared = earlier_run / "baseline"
    before = contents(shared)
    outdir = tmp_path / "b1"
    args = ("--outdir", outdir, "--baseline_outdir", shared, "--prompt", "a blue square", *BASELINE, *FAST)
    refused = invoke("bench", *args)
    assert refused.exit_code == 2
    assert refused.output.splitlines() == [
        f"Error: '{shared}' already holds baseline images (baseline_s1_i0_seed0.png); pass a new --baseline_outdir "
        "or add --overwrite to replace them."]
    assert contents(shared) == before
    assert not outdir.exists()

    replaced = invoke("bench", *args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert contents(shared).keys() == before.keys() and contents(shared) != before
    assert record_json(outdir)[0]["images"] == [str(shared / "baseline_s1_i0_seed0.png")]


def test_a_baseline_folder_another_run_is_writing_is_refused(tmp_path, embedded_model):
    shared, outdir = tmp_path / "baseline_results", tmp_path / "run"
    with FolderLock(shared, "--baseline_outdir"):
        result = invoke("bench", "--outdir", outdir, "--baseline_outdir", shared, *BASELINE, *FAST)
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: '{shared}' is in use by another harness run (process {os.getpid()} on ")
    assert result.output.rstrip().endswith("wait for it to end or pass another --baseline_outdir.")
    assert not outdir.exists() and list(shared.iterdir()) == []


@pytest.mark.parametrize("baseline, problem", [
    ("afile", "File exists; pass a writable --baseline_outdir."),
    ("afile/sub", "Not a directory; pass a writable --baseline_outdir."),
    ("run/image_s1_i0_seed0.png",
     "the run writes its file 'image_s1_i0_seed0.png' there; pass another --baseline_outdir."),
])
def test_a_baseline_folder_that_cannot_be_one_is_refused_before_anything_is_written(tmp_path, embedded_model,
                                                                                   baseline, problem):
    (tmp_path / "afile").write_text("hi")
    folder = tmp_path / baseline
    result = invoke("bench", "--outdir", tmp_path / "run", "--baseline_outdir", folder, *BASELINE, *FAST)
    assert result.exit_code == 2
    assert result.output.splitlines() == [f"Error: cannot write to baseline folder '{folder}': {problem}"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "hi"


def test_a_page_of_the_users_own_in_the_folder_is_never_replaced(tmp_path, monkeypatch, embedded_model):
    project = tmp_path / "project"
    project.mkdir()
    page = project / "index.html"
    page.write_text("<p>my project's page</p>\n")
    monkeypatch.chdir(project)
    refused = invoke("bench", "--outdir", ".", "--steps", "1", "--html", *FAST)
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1] == (
        "Error: 'index.html' exists and is not a page harness wrote; move it out of the run folder, then write the "
        "page with harness report '.' --html.")
    assert sorted(path.name for path in project.iterdir()) == ["index.html"]  # refused before the run, not after
    assert invoke("bench", "--outdir", ".", "--steps", "1", *FAST).exit_code == 0
    summary = (project / "summary.md").read_bytes()
    assert invoke("report", ".", "--html").exit_code == 2
    assert (project / "summary.md").read_bytes() == summary
    # --overwrite replaces the run's files, not the user's page beside them.
    assert invoke("bench", "--outdir", ".", "--steps", "2", "--overwrite", *FAST).exit_code == 0
    assert page.read_text() == "<p>my project's page</p>\n"
    assert (project / "image_s2_i0_seed0.png").is_file() and not (project / "image_s1_i0_seed0.png").exists()


@pytest.mark.parametrize("looping", ["--baseline_outdir", "--outdir"])
def test_a_folder_that_leads_into_a_loop_of_links_is_refused_in_one_line(tmp_path, embedded_model, looping):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    folders = {"--outdir": tmp_path / "run", "--baseline_outdir": tmp_path / "shared"}
    folders[looping] = loop / "x"
    result = invoke("bench", *BASELINE, "--outdir", folders["--outdir"], "--baseline_outdir",
                    folders["--baseline_outdir"], *FAST)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot write to '{loop / 'x'}': it leads into a loop of symbolic links (or is no valid path); "
        f"pass another {looping}.")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["loop"]
