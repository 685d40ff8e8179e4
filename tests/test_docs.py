"""The documentation: its generated tables match the code, its plugin examples run, and the site builds and renders.

The site test needs the docs extra (``pip install -e ".[docs]"``) and Chromium. Where CI installs them it sets
HARNESS_REQUIRE_DOCS (and HARNESS_REQUIRE_BROWSER), and a missing one then fails the test instead of skipping it.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import invoke, record_json

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TABLES = ROOT / "scripts" / "docs_tables.py"
CHROMIUM = shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).is_file()), None)


def python_block(page: Path, after: str = "") -> str:
    """The first ```python block of a docs page (after the heading ``after``, when given)."""
    text = page.read_text(encoding="utf-8")
    if after:
        text = text.split(after, 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def docs_tables(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TABLES), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


# ----- the generated tables -----

def test_the_generated_tables_match_the_code():
    result = docs_tables("--check")
    assert result.returncode == 0, result.stderr


def test_a_stale_table_is_named_and_an_unknown_one_refused(tmp_path):
    stale = tmp_path / "cli.md"
    stale.write_text((DOCS / "reference" / "cli.md").read_text(encoding="utf-8").replace(
        "| `--warmup` `INTEGER RANGE` | `2` |", "| `--warmup` `INTEGER RANGE` | `3` |"), encoding="utf-8")
    fresh = tmp_path / "errors.md"
    fresh.write_text((DOCS / "reference" / "errors.md").read_text(encoding="utf-8"), encoding="utf-8")
    result = docs_tables("--check", stale, fresh)
    assert result.returncode == 1
    assert "cli.md: a generated table differs from the code" in result.stderr and "errors.md" not in result.stderr
    assert "| `--warmup` `INTEGER RANGE` | `3` |" in stale.read_text(encoding="utf-8")  # --check changes nothing

    assert docs_tables(stale).returncode == 0
    assert "| `--warmup` `INTEGER RANGE` | `2` |" in stale.read_text(encoding="utf-8")

    unknown = tmp_path / "unknown.md"
    unknown.write_text("<!-- BEGIN GENERATED: nosuch-options -->\n<!-- END GENERATED -->\n", encoding="utf-8")
    result = docs_tables("--check", unknown)
    assert result.returncode == 2 and "no generated table is called 'nosuch-options'" in result.stderr


def test_every_command_and_trainer_has_its_table():
    cli_page = (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")
    for name in ("harness", "bench", "eval", "report", "compare", "leaderboard", "plugins", "data-shapes", "train",
                 "train-shared", "train-distill", "train-lcm", "train-flash", "train-pretrain"):
        assert f"<!-- BEGIN GENERATED: {name}-options -->\n| Option |" in cli_page, name
    exit_codes = "<!-- BEGIN GENERATED: exit-codes -->\n| Exit code | Name | Meaning |"
    for page in (ROOT / "README.md", DOCS / "reference" / "errors.md"):
        assert exit_codes in page.read_text(encoding="utf-8"), page


# ----- the plugin examples of the guides -----

def test_the_metric_example_registers_and_scores(tmp_path):
    from PIL import Image

    from harness.hooks.registry import Registry

    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "harness_mad.py").write_text(python_block(DOCS / "plugins" / "metrics.md"), encoding="utf-8")
    registry = Registry([folder])
    assert not registry.broken()
    cls = registry.metrics["mad"].cls
    assert cls.needs_reference and not cls.higher_is_better

    import torch

    from harness import MetricConfig, MetricInput

    images = [Image.new("RGB", (8, 8), (10, 20, 30)), Image.new("RGB", (8, 8), (0, 0, 0))]
    references = [Image.new("RGB", (8, 8), (10, 20, 30)), Image.new("RGB", (8, 8), (30, 30, 30))]
    result = cls(MetricConfig(torch.device("cpu"))).score(MetricInput(images, ["a", "b"], references))
    assert result["per_image"] == [0.0, 30.0] and result["value"] == 15.0
    grey = cls(MetricConfig(torch.device("cpu")), cls.Options(mad_grayscale=True))
    assert grey.score(MetricInput(images[:1], ["a"], references[:1]))["value"] == 0.0

    assert "--mad-grayscale" in invoke("--plugin-dir", folder, "bench", "--help").output


def test_the_command_example_adds_a_command(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "harness_hello.py").write_text(python_block(DOCS / "plugins" / "index.md"), encoding="utf-8")
    result = invoke("--plugin-dir", folder, "hello", "--name", "docs")
    assert result.exit_code == 0 and result.output == "hello, docs\n"


@pytest.mark.slow
def test_the_metric_example_scores_a_bench_run(tmp_path, embedded_model):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "harness_mad.py").write_text(python_block(DOCS / "plugins" / "metrics.md"), encoding="utf-8")
    result = invoke("--plugin-dir", folder, "bench", "--model", "embedded", "--sampler", "flash-lcm",
                    "--compare_baseline", "--steps", "1", "--baseline_steps", "2", "--metric", "mad",
                    "--mad-grayscale", "--warmup", "0", "--repeats", "1", "--seed", "0", "--outdir", tmp_path / "run",
                    "-q")
    assert result.exit_code == 0, result.output
    flash = next(r for r in record_json(tmp_path / "run") if r["sampler"] == "flash-lcm")
    mad = flash["metrics"]["mad"]
    assert mad["higher_is_better"] is False and mad["reference"] == "vanilla-sd 2 steps"
    assert 0 < mad["value"] < 255 and len(mad["per_image"]) == 1


def colour_fd_plugin(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "harness_colour_fd.py").write_text(python_block(DOCS / "plugins" / "metrics.md", "## A set-level metric"),
                                                 encoding="utf-8")
    return folder


def test_the_set_metric_example_merges_states_as_one_process_would(tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from harness import MetricConfig, MetricInput
    from harness.hooks.registry import Registry
    from tests.plugins.test_lab_distance import frechet_oracle

    cls = Registry([colour_fd_plugin(tmp_path)]).metrics["colour-fd"].cls
    assert cls.reference_set and cls.dimensions == 3
    rng = np.random.default_rng(0)
    colours = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(40)]
    images = [Image.new("RGB", (8, 8), colour) for colour in colours]
    reference = cls(MetricConfig(torch.device("cpu")))
    reference.reset()
    reference.update(MetricInput(images[20:], [""] * 20))
    reference.use_as_reference("the other half")

    def one_process(metric):
        metric.reset()
        metric.update(MetricInput(images[:20], [""] * 20, indices=range(20)))
        return metric

    def two_processes(metric):  # ranks 0 and 1 take every other picture; rank 0 merges rank 1's state
        rank1 = cls(MetricConfig(torch.device("cpu")))
        rank1.reset()
        rank1.update(MetricInput(images[1:20:2], [""] * 10, indices=range(1, 20, 2)))
        metric.reset()
        metric.update(MetricInput(images[0:20:2], [""] * 10, indices=range(0, 20, 2)))
        metric.merge([rank1.state()])
        return metric

    values = []
    for combine in (one_process, two_processes):
        metric = combine(cls(MetricConfig(torch.device("cpu"))))
        metric.use_reference_statistics(reference.statistics(), "the other half")
        values.append(metric.compute()["value"])
    features = np.array(colours, dtype=np.float64) / 255
    assert values[0] == pytest.approx(frechet_oracle(features[:20], features[20:]), rel=1e-6)
    assert values[1] == pytest.approx(values[0], rel=1e-9)


@pytest.mark.slow
def test_the_set_metric_example_runs_with_saved_statistics_as_its_reference(tmp_path, embedded_model):
    folder = colour_fd_plugin(tmp_path)
    common = ("--plugin-dir", folder, "bench", "--model", "embedded", "--steps", "1", "--prompts", "held-out",
              "--prompt_count", "4", "--num_images", "2", "--metric", "colour-fd", "--warmup", "0", "--repeats", "1",
              "--seed", "0", "-q")
    first = invoke(*common, "--compare_baseline", "--baseline_steps", "2", "--save_stats", tmp_path / "stats",
                   "--outdir", tmp_path / "run")
    assert first.exit_code == 0, first.output
    flash = next(r for r in record_json(tmp_path / "run") if r["sampler"] == "flash-lcm")
    assert flash["metrics"]["colour-fd"]["reference"] == "vanilla-sd 2 steps"
    stats = tmp_path / "stats" / "colour-fd_vanilla-sd_2steps.npz"
    assert sorted(p.name for p in stats.parent.iterdir()) == ["colour-fd_flash-lcm_1steps.npz", stats.name]
    second = invoke(*common, "--reference_stats", f"colour-fd={stats}", "--save_images", "none",
                    "--outdir", tmp_path / "again")
    assert second.exit_code == 0, second.output
    [again] = record_json(tmp_path / "again")
    assert again["metrics"]["colour-fd"]["value"] == pytest.approx(flash["metrics"]["colour-fd"]["value"], rel=1e-9)
    assert again["images"] == [] and again["images_made"] == 8


@pytest.mark.slow
def test_the_distillation_trainer_example_trains_and_benches(tmp_path, embedded_model):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    source = python_block(DOCS / "plugins" / "trainers.md", after="## A distillation trainer")
    (folder / "harness_onestep.py").write_text(source, encoding="utf-8")
    data = tmp_path / "shapes"
    assert invoke("data", "shapes", "--out", data, "--n", "4", "--seed", "0", "--resolution", "64").exit_code == 0
    result = invoke("--plugin-dir", folder, "train", "--plugin", "onestep", "--model", "embedded", "--data_dir", data,
                    "--batch_size", "2", "--grad_accum", "1", "--max_steps", "2", "--teacher-steps", "2",
                    "--seed", "0", "--output_dir", tmp_path / "ckpt", "--run_name", "onestep")
    assert result.exit_code == 0, result.output
    final = tmp_path / "ckpt" / "onestep" / "lora" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    losses = [line for line in (tmp_path / "ckpt" / "onestep" / "train_log.jsonl").read_text().splitlines() if line]
    assert len(losses) == 2
    result = invoke("bench", "--sampler", "local-student", "--model", "embedded", "--lora_path", final, "--steps", "1",
                    "--warmup", "0", "--repeats", "1", "--seed", "0", "--outdir", tmp_path / "run", "-q")
    assert result.exit_code == 0, result.output


# ----- the site -----

def _require(missing: str | None, variable: str) -> None:
    if missing is not None:
        pytest.fail(missing) if os.environ.get(variable) else pytest.skip(missing)


def docs_tools_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"the docs tools are not installed (no {module}); pip install -e '.[docs]'"
    return None


def chromium_dom(page: Path, profile: Path) -> str:
    """Headless Chromium's DOM of a page, with nothing that reaches out (no sync, updates or QUIC)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def visible_text(dom: str) -> str:
    body = dom[dom.index("<body"):]
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)).replace("&amp;", "&").replace("&gt;", ">")


@pytest.mark.slow
def test_the_site_builds_strictly_and_renders_in_chromium(tmp_path):
    _require(docs_tools_missing(), "HARNESS_REQUIRE_DOCS")
    # CI installs Debian's chromium and sets HARNESS_REQUIRE_BROWSER, so there a missing browser fails the test.
    _require(None if CHROMIUM else "no chromium binary (shutil.which('chromium') or /usr/bin/chromium); "
             "apt-get install chromium", "HARNESS_REQUIRE_BROWSER")
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stderr[-5000:]

    profile = tmp_path / "profile"
    home = visible_text(chromium_dom(site / "index.html", profile))
    for entry in ("Quick start", "Guides", "Reference", "Writing plugins", "Lab journal", "A sampler", "A trainer"):
        assert entry in home, entry  # the navigation
    assert "few-step text-to-image diffusion" in home

    samplers = visible_text(chromium_dom(site / "plugins" / "samplers" / "index.html", profile))
    for name in ("default_guidance", "is_baseline", "file_label", "call_arguments", "GenerationRequest"):
        assert name in samplers, name  # the API reference, from the docstrings
    assert "DdimSampler" in samplers and "ddim_eta" in samplers  # the guide's example

    trainers = visible_text(chromium_dom(site / "plugins" / "trainers" / "index.html", profile))
    for name in ("teacher_outputs", "student_timesteps", "NoiseSchedule", "CLEAN", "alpha_sigma", "compute_loss"):
        assert name in trainers, name

    cli_page = visible_text(chromium_dom(site / "reference" / "cli" / "index.html", profile))
    assert "--baseline-guidance" in cli_page and "--teacher-guidance" in cli_page and "FILE|SET" in cli_page
    errors = visible_text(chromium_dom(site / "reference" / "errors" / "index.html", profile))
    assert "ExitCode.USAGE" in errors and "already holds a run" in errors
