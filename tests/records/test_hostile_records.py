"""Hostile records.jsonl values and output paths: what report, compare and leaderboard do with them.

A value the schema accepts must never crash a reader; a value no harness run writes is named as
``line N of FILE: what is wrong`` and skipped; no record and no ``--html`` makes harness write over a file of a run.
"""

import dataclasses
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from harness.records.training_run import CONFIG_FILE as TRAIN_CONFIG
from harness.records.training_run import LOG_FILE as TRAIN_LOG
from harness.reporting import leaderboard
from harness.reporting import runs as run_folders
from tests.benchmark.test_hostile_inputs import write_run
from tests.conftest import invoke, make_record

CONFIG = {"model": "embedded", "prompts": ["a cat"], "num_images": 1, "seed": 42, "warmup": 0, "repeats": 5}


def with_images(run: Path) -> Path:
    """Give every image a run's records name a real PNG, so the grids can be rebuilt from them."""
    for line in (run / "records.jsonl").read_text().splitlines():
        for name in json.loads(line).get("images", []):
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), "red").save(run / name)
    return run


def edit_line(run: Path, number: int, change) -> bytes:
    """Apply ``change`` to the JSON of line ``number`` of the run's records; return the file's new bytes."""
    path = run / "records.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[number - 1])
    change(record)
    lines[number - 1] = json.dumps(record)
    path.write_text("".join(line + "\n" for line in lines))
    return path.read_bytes()


def set_metric(record, value):
    record["metrics"] = {"psnr": {"value": value, "higher_is_better": True}}


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.update(images=[]), "'images' is empty; a measurement names the 1 or more images it made"),
    (lambda r: r.update(image_size=[64]), "'image_size' is [64]; it is [width, height], two whole numbers above 0"),
    (lambda r: r.update(image_size=[0, 64]), "'image_size' is [0, 64]; it is [width, height], two whole numbers "
                                             "above 0"),
    (lambda r: set_metric(r, 10**400), "'metrics.psnr.value' should be a number or null, not "
                                       "1000000000000000000000000000000000000..."),
    (lambda r: set_metric(r, "high"), "'metrics.psnr.value' should be a number or null, not 'high'"),
    (lambda r: r.update(steps=10**400), "'steps' should be a whole number between -1.8e308 and 1.8e308, not "
                                        "1000000000000000000000000000000000000..."),
    (lambda r: r.update(guidance_scale=10**400), "'guidance_scale' should be a finite number, not "
                                                 "1000000000000000000000000000000000000..."),
    (lambda r: r["config"].update(prompts=None), "'config.prompts' should be a list of texts, not None"),
    (lambda r: r["config"].update(prompts=["a cat", 3]),
     "'config.prompts' should be a list of texts, not ['a cat', 3]"),
    (lambda r: r.update(grid="g" * 300 + ".png"), f"'grid' '{'g' * 36}... has a part longer than 255 bytes, "
                                                  "which no file name can"),
    (lambda r: r.update(images=["a\x00b.png"]), "'images[0]' 'a\\x00b.png' holds a NUL character, which no file "
                                                "name can"),
    (lambda r: r.update(grid="records.jsonl"), "'grid' 'records.jsonl' is not the name of a .png image"),
    (lambda r: r["comparisons"].append({"baseline_sampler": "vanilla-sd", "baseline_steps": 30, "path": "summary.md"}),
     "'comparisons[0].path' 'summary.md' is not the name of a .png image"),
    (lambda r: r["stages"].update(total_s=0.0, denoise_s=0.0), "'stages.total_s' is 0.0; a measured time is above 0"),
    (lambda r: r["stages"].update(denoise_s=2.0), "'stages.denoise_s' is 2.0; denoising is part of the call, 0 to "
                                                  "'stages.total_s' (0.1) seconds"),
])
def test_a_value_no_run_writes_is_named_and_skipped_by_every_reader(tmp_path, change, problem):
    run = with_images(write_run(tmp_path / "run"))
    other = with_images(write_run(tmp_path / "other"))
    before = edit_line(run, 2, change)
    warning = f"Warning: line 2 of {run / 'records.jsonl'}: {problem}; skipped"

    reported = invoke("report", run, "--html")
    assert reported.exit_code == 0, reported.output
    assert warning in reported.output.splitlines()
    assert "| vanilla-sd " in reported.output and "| flash-lcm " not in reported.output
    assert (run / "index.html").is_file()

    compared = invoke("compare", other, run, "--html", tmp_path / "compare.html")
    assert compared.exit_code == 0, compared.output
    assert warning in compared.output.splitlines()
    assert "flash-lcm" in compared.output  # the other run's row, not compared
    assert (run / "records.jsonl").read_bytes() == before


def test_a_null_metric_value_is_a_row_without_a_value(tmp_path):
    """A metric that gave no number (null) leaves its cell blank and its point off the plots, in every reader."""
    def scored(steps, seconds, value):
        return make_record("flash-lcm", steps, seconds, config=CONFIG,
                           metrics={"psnr": {"value": value, "higher_is_better": True}})

    run = with_images(write_run(tmp_path / "run", scored(2, 0.1, None), scored(4, 0.2, 21.0)))
    other = with_images(write_run(tmp_path / "other", scored(2, 0.1, 20.0), scored(4, 0.2, 22.0)))

    reported = invoke("report", run)
    assert reported.exit_code == 0, reported.output
    assert (run / "quality.png").is_file()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in reported.output.splitlines()
            if line.startswith("| flash-lcm ")]
    assert [(row[1], row[-1]) for row in rows] == [("2", ""), ("4", "21")]  # blank, not "None"

    board = invoke("leaderboard", run, other, "--metric", "psnr", "--outdir", tmp_path / "board")
    assert board.exit_code == 0, board.output
    rows = json.loads((tmp_path / "board" / "leaderboard.json").read_text())["rows"]
    assert [(r["steps"], r["value"], r["rank"]) for r in rows if r["run"] == str(run)] == [(2, None, None),
                                                                                          (4, 21.0, 2)]


def test_a_grid_named_after_an_image_of_the_run_is_not_written(tmp_path):
    run = with_images(write_run(tmp_path / "run"))
    baseline_image = json.loads((run / "records.jsonl").read_text().splitlines()[0])["images"][0]
    edit_line(run, 2, lambda r: r.update(grid=baseline_image))
    image = (run / baseline_image).read_bytes()

    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert (f"Warning: not rebuilding the grids of flash-lcm (2 steps): its grid '{baseline_image}' is one of the "
            "run's images, which a grid must not replace.") in result.output.splitlines()
    assert (run / baseline_image).read_bytes() == image
    assert (run / "baseline" / "grid_baseline_s30_seed42.png").is_file()  # the baseline's own grid is rebuilt


def test_a_record_naming_records_jsonl_as_its_grid_leaves_the_records_alone(tmp_path):
    run = with_images(write_run(tmp_path / "run"))
    before = edit_line(run, 2, lambda r: r.update(grid="records.jsonl"))
    assert invoke("report", run).exit_code == 0
    assert (run / "records.jsonl").read_bytes() == before


@pytest.mark.parametrize("target", ["records.jsonl", "summary.md", "image_s2_i0_seed42.png", "notes.txt",
                                    "own.html"])
def test_compare_html_never_replaces_a_file_that_is_not_a_harness_page(tmp_path, target):
    a = with_images(write_run(tmp_path / "a"))
    b = with_images(write_run(tmp_path / "b"))
    assert invoke("report", a).exit_code == 0  # writes a's summary.md
    (a / "notes.txt").write_text("my notes\n")
    (a / "own.html").write_text("<!DOCTYPE html><p>my own page</p>\n")
    before = {path.name: path.read_bytes() for path in a.iterdir() if path.is_file()}

    result = invoke("compare", a, b, "--html", a / target)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"Error: --html '{a / target}' is an existing file that is not a page harness wrote (such as a run's "
        "records.jsonl); pass --html a new file name, e.g. compare.html.")
    assert {path.name: path.read_bytes() for path in a.iterdir() if path.is_file()} == before


def test_compare_html_replaces_its_own_earlier_page(tmp_path):
    a = with_images(write_run(tmp_path / "a"))
    b = with_images(write_run(tmp_path / "b"))
    page = tmp_path / "compare.html"
    assert invoke("compare", a, b, "--html", page).exit_code == 0
    first = page.read_text()
    assert invoke("compare", b, a, "--html", page).exit_code == 0
    assert page.read_text() != first


def test_report_html_keeps_an_index_html_harness_did_not_write(tmp_path):
    run = with_images(write_run(tmp_path / "run"))
    (run / "index.html").write_text("<p>my project's page</p>\n")
    result = invoke("report", run, "--html")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        f"Error: '{run / 'index.html'}' exists and is not a page harness wrote; move it out of the run folder, then "
        f"write the page with harness report '{run}' --html.")
    assert (run / "index.html").read_text() == "<p>my project's page</p>\n"
    assert invoke("report", run).exit_code == 0
    (run / "index.html").unlink()
    assert invoke("report", run, "--html").exit_code == 0
    assert invoke("report", run, "--html").exit_code == 0  # its own page is replaced


def test_a_huge_step_in_a_train_log_is_passed_over(tmp_path):
    training = tmp_path / "checkpoints" / "distill"
    (training / "lora" / "final").mkdir(parents=True)
    (training / TRAIN_CONFIG).write_text(json.dumps({"trainer": "distill"}))
    (training / TRAIN_LOG).write_text(json.dumps({"step": 100, "seconds": 50.0}) + "\n"
                                      + '{"step": ' + "9" * 400 + ', "seconds": 60.0}\n')
    lora = str(training / "lora" / "final")
    record = make_record("local-student", 2, 0.1, config=CONFIG,
                         metrics={"psnr": {"value": 20.0, "higher_is_better": True}})
    info = {**record.measured.sampler_info, "lora": lora}
    run = write_run(tmp_path / "run", dataclasses.replace(
        record, measured=dataclasses.replace(record.measured, sampler_info=info)))

    result = invoke("leaderboard", run, "--outdir", tmp_path / "board")
    assert result.exit_code == 0, result.output
    (row,) = json.loads((tmp_path / "board" / "leaderboard.json").read_text())["rows"]
    assert row["training"]["steps"] == 100 and row["training"]["seconds"] == 50.0


def test_a_run_folder_name_that_is_not_utf8_is_shown_escaped(tmp_path):
    """bench --html, report --html and leaderboard write their page and plot; the name reads as \\udcff."""
    def scored(value):
        return make_record("flash-lcm", 2, 0.1, config=CONFIG, metrics={"psnr": {"value": value,
                                                                               "higher_is_better": True}})

    plain = with_images(write_run(tmp_path / "plain", scored(20.0)))
    odd = with_images(write_run(tmp_path / os.fsdecode(b"odd\xff"), scored(21.0)))

    assert invoke("report", odd, "--html").exit_code == 0
    assert "<h1>harness run odd\\udcff</h1>" in (odd / "index.html").read_text(encoding="utf-8")

    runs = run_folders.load_runs([plain, odd], print)
    board = leaderboard.build_leaderboard(runs, "psnr")
    assert [row.label for row in board.rows] == ["flash-lcm [odd\udcff]", "flash-lcm [plain]"]
    written = leaderboard.write_leaderboard(tmp_path / "board", board, run_folders.title(runs))
    assert [path.name for path in written] == ["leaderboard.json", "leaderboard.md", "leaderboard.png"]
    assert "[odd\\udcff]" in (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")


def test_a_sampler_name_with_dollar_signs_is_plotted_as_written(tmp_path):
    run = with_images(write_run(tmp_path / "run", make_record("vanilla-sd", 30, 1.0, baseline=True, guidance_scale=7.5),
                                make_record("my$\\sampler$", 2, 0.1)))
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert "![seconds per image against steps](latency.png)" in (run / "summary.md").read_text()
