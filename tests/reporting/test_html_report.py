"""The HTML pages of `report --html`, `bench --html` and `compare --html`: content, escaping, missing images,
no network, and a real headless Chromium that loads them."""

import dataclasses
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from harness.benchmark.record import RunWriter
from harness.records.schema import Comparison
from harness.records.store import append_record, read_records
from harness.reporting import report
from tests.conftest import invoke, make_record, record_json
from tests.reporting.test_report import BASELINE, FAST

SCRIPT = "<script>alert('prompt')</script>"
CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).is_file()), None)


class Page(HTMLParser):
    """What the tests read from a page: its tables (rows of cell texts, unescaped) and every tag's attributes."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.tags: list[tuple[str, dict]] = []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def sources(self) -> list[str]:
        return [attrs["src"] for tag, attrs in self.tags if tag == "img"]

    def table_with(self, header: str) -> list[list[str]]:
        return next(table for table in self.tables if header in table[0])


def square(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


def fake_run(folder: Path, prompt: str = "a red circle", error: str = "CUDA out of memory: reduce --num_images to 1",
             sampler: str = "flash-lcm") -> Path:
    """A run folder made without diffusion: a baseline, a few-step record with its comparison, a failed record."""
    config = {**BASELINE.config, "prompts": [prompt]}
    records = [
        dataclasses.replace(BASELINE, config=config, measured=dataclasses.replace(
            BASELINE.measured, images=["baseline/baseline_s30_i0.png"], grid="baseline/grid_baseline_s30.png")),
        dataclasses.replace(FAST, sampler=sampler, config=config, measured=dataclasses.replace(
            FAST.measured, images=["image_s2_i0.png"], grid="grid_s2.png",
            comparisons=[Comparison("vanilla-sd", 30, "compare_baseline30_flash2.png")])),
        make_record(sampler, 4, error=error, config=config),
    ]
    square(folder / "baseline/baseline_s30_i0.png", "navy")
    square(folder / "image_s2_i0.png", "orange")
    for record in records:
        append_record(folder / "records.jsonl", record)
    return folder


def report_html(folder: Path):
    result = invoke("report", folder, "--html")
    assert result.exit_code == 0, result.output
    return result, (folder / "index.html").read_text(encoding="utf-8")


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]


def _cell(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_report_page_has_every_row_grid_plot_and_setting(tmp_path):
    run = fake_run(tmp_path / "run")
    result, text = report_html(run)
    assert not warnings(result) and "Traceback" not in result.output
    page = Page(text)
    records = read_records(run)

    timing = page.table_with("ms/image")
    headers, rows = report.summary_rows(records)
    assert timing[0] == headers
    assert timing[1:3] == [[_cell(cell) for cell in row] for row in rows[:2]]  # the same cells as summary.md
    assert timing[3] == ["flash-lcm", "4", "0", "failed: CUDA out of memory: reduce --num_images to 1"]
    assert len(page.table_with("denoise ms")) == 1 + 2  # a stage row per successful record

    expected = {"latency.png", "grid_s2.png", "baseline/grid_baseline_s30.png", "compare_baseline30_flash2.png"}
    assert set(page.sources()) == expected
    assert all((run / name).is_file() for name in expected)

    settings = dict(row for table in page.tables if table[0] == ["key", "value"] for row in table[1:])
    assert settings["model"] == "embedded" and settings["seed"] == "1" and settings["device"] == "cpu"
    assert (run / "summary.md").is_file()


def test_user_text_is_escaped(tmp_path):
    error = "boom <img src=x onerror=alert(1)>"
    run = fake_run(tmp_path / "run", prompt=SCRIPT, error=error, sampler="flash<b>lcm</b>")
    _, text = report_html(run)
    assert SCRIPT not in text and html.escape(SCRIPT) in text
    assert "<b>" not in text and "<img src=x" not in text
    page = Page(text)
    assert [tag for tag, _ in page.tags].count("script") == 1  # only the page's own load check
    assert page.table_with("ms/image")[3][-1] == "failed: " + error  # shown as text, whole


def test_pages_reach_no_network(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    _, run_text = report_html(a)
    assert invoke("compare", a, b, "--html", tmp_path / "compare.html").exit_code == 0
    for text in (run_text, (tmp_path / "compare.html").read_text(encoding="utf-8")):
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
        assert "http://" not in text and "https://" not in text
        assert "default-src 'none'" in text  # the browser is told to load nothing else either


def test_missing_image_gets_a_placeholder_and_one_warning(tmp_path):
    run = fake_run(tmp_path / "run")
    report_html(run)
    (run / "image_s2_i0.png").unlink()  # the grid cannot be rebuilt...
    (run / "grid_s2.png").unlink()  # ...and is gone
    result, text = report_html(run)
    assert "Traceback" not in result.output
    assert len([line for line in warnings(result) if "'grid_s2.png'" in line]) == 1
    assert any("cannot rebuild the grids of flash-lcm (2 steps): image 'image_s2_i0.png' is missing" in line
               for line in warnings(result))
    assert '<div class="missing">missing: grid_s2.png</div>' in text
    assert "grid_s2.png" not in Page(text).sources()
    assert "compare_baseline30_flash2.png" in Page(text).sources()  # the rest is still shown
    assert (run / "summary.md").is_file()


def test_plain_report_with_a_missing_image_warns_instead_of_a_traceback(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / "image_s2_i0.png").unlink()
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert len(warnings(result)) == 1 and "Traceback" not in result.output
    assert not (run / "index.html").exists()


def test_names_outside_the_run_folder_are_neither_written_nor_shown(tmp_path):
    run = fake_run(tmp_path / "run")
    outside, absolute = tmp_path / "outside.png", tmp_path / "absolute.png"
    square(outside, "red")
    square(absolute, "red")
    before = outside.read_bytes(), absolute.read_bytes()
    records = record_json(run)
    records[1]["grid"] = "../outside.png"
    records[1]["comparisons"][0]["path"] = str(absolute)
    (run / "records.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    result, text = report_html(run)
    assert (outside.read_bytes(), absolute.read_bytes()) == before
    assert "missing: ../outside.png" in text and f"missing: {absolute}" in text
    assert all(".." not in src and not src.startswith("/") for src in Page(text).sources())
    assert sum("lies outside the run folder" in line for line in warnings(result)) == 3  # rebuild + 2 images


def test_compare_page_shows_both_runs_side_by_side(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    report_html(a), report_html(b)
    (tmp_path / "pages").mkdir()
    out = tmp_path / "pages" / "compare.html"
    result = invoke("compare", a, b / "records.jsonl", "--html", out)
    assert result.exit_code == 0, result.output
    assert "| flash-lcm" in result.stdout  # the text table is still printed
    assert [p.name for p in out.parent.iterdir()] == ["compare.html"]  # nothing else written there
    text = out.read_text(encoding="utf-8")
    page = Page(text)
    compared = page.table_with("B/A")
    assert compared[1:] == [["vanilla-sd", "30", "7.5", "64x64", "1", "1", "1", "1.000", "+0.0%"],
                            ["flash-lcm", "2", "0", "64x64", "1", "0.1", "0.1", "1.000", "+0.0%"]]
    assert sum(1 for table in page.tables if "ms/image" in table[0]) == 2  # each run's own timing table
    assert f"A: {a}" in text and f"B: {b / 'records.jsonl'}" in text
    assert len(page.sources()) == 2 * 4 and all(src.startswith("data:image/png;base64,") for src in page.sources())


def test_compare_page_with_a_missing_image_still_written(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    report_html(a), report_html(b)
    (b / "latency.png").unlink()  # optional: simply not shown
    (b / "grid_s2.png").unlink()
    result = invoke("compare", a, b, "--html", tmp_path / "compare.html")
    assert result.exit_code == 0, result.output
    assert len(warnings(result)) == 1 and f"named in {b / 'records.jsonl'}" in warnings(result)[0]
    assert "missing: grid_s2.png" in (tmp_path / "compare.html").read_text(encoding="utf-8")


def test_compare_html_into_a_missing_folder_is_one_error_line(tmp_path):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    result = invoke("compare", a, b, "--html", tmp_path / "nowhere" / "compare.html")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: cannot write") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


TINY = ("--model", "embedded", "--steps", "1", "--warmup", "0", "--repeats", "1", "--seed", "0",
        "--compare_baseline", "--baseline_steps", "2", "--quiet", "--html")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, embedded_model):
    """A real, tiny `harness bench --html` run: every file the page names is there."""
    outdir = tmp_path_factory.mktemp("html") / "run"
    result = invoke("bench", "--outdir", outdir, *TINY)
    assert result.exit_code == 0, result.output
    return outdir, result


@pytest.mark.slow
def test_bench_html_writes_the_page_at_the_end(bench_run):
    outdir, result = bench_run
    assert "summary.md and index.html in" in result.stderr and not warnings(result)
    sources = set(Page((outdir / "index.html").read_text(encoding="utf-8")).sources())
    records = record_json(outdir)
    named = {r["grid"] for r in records} | {c["path"] for r in records for c in r["comparisons"]}
    assert sources == named | {"latency.png"}


def test_bench_html_after_an_interrupt_keeps_the_finished_records(tmp_path, embedded_model, monkeypatch):
    add = RunWriter.add

    def add_then_interrupt(self, record):
        add(self, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWriter, "add", add_then_interrupt)
    result = invoke("bench", "--outdir", tmp_path / "run", *TINY)
    assert result.exit_code == 130, result.output
    page = Page((tmp_path / "run" / "index.html").read_text(encoding="utf-8"))
    assert [row[0] for row in page.table_with("ms/image")[1:]] == ["vanilla-sd"]
    assert page.sources() == ["latency.png", "baseline/grid_baseline_s2_seed0.png"]


def chromium(page: Path, profile: Path, *options: str) -> str:
    """Run headless Chromium on a page with nothing that reaches out (no sync, updates or QUIC); its stdout."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *options, page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["run", "compare"])
def test_chromium_loads_every_image_without_errors(bench_run, tmp_path, kind):
    if CHROMIUM is None:
        # CI installs Debian's chromium and sets HARNESS_REQUIRE_BROWSER, so there a missing browser fails the test.
        missing = "no chromium binary (shutil.which('chromium') or /usr/bin/chromium); apt-get install chromium"
        pytest.fail(missing) if os.environ.get("HARNESS_REQUIRE_BROWSER") else pytest.skip(missing)
    outdir, _ = bench_run
    page = outdir / "index.html"
    if kind == "compare":
        page = tmp_path / "compare.html"
        assert invoke("compare", outdir, outdir, "--html", page).exit_code == 0
    images = len(Page(page.read_text(encoding="utf-8")).sources())
    assert images >= 4

    dom = chromium(page, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom")
    body = dict(Page(dom[dom.index("<body"):]).tags[0][1])
    assert "data-js-errors" not in body, body["data-js-errors"]
    assert (body.get("data-images-loaded"), body.get("data-images-broken")) == (str(images), "0")

    chromium(page, tmp_path / "profile", "--window-size=1280,2000", f"--screenshot={tmp_path / 'shot.png'}")
    shot = Image.open(tmp_path / "shot.png").convert("RGB")
    assert shot.size == (1280, 2000)
    assert len(shot.getcolors(maxcolors=1 << 24)) > 50 and ImageStat.Stat(shot.convert("L")).stddev[0] > 10
