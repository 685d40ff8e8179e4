"""Plugin discovery: built-ins, an installed third-party distribution, plugin folders, broken plugins."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.plugins import Registry
from harness.records import read_records
from tests.conftest import invoke

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_plugin_source() -> str:
    """The complete plugin shown under "Writing a sampler plugin" in README.md."""
    section = README.read_text(encoding="utf-8").split("### Writing a sampler plugin", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def install_distribution(site: Path, dist_name: str, module: str, source: str) -> None:
    """What `pip install` leaves behind: the module plus a dist-info with a `harness` entry point."""
    (site / f"{module}.py").write_text(source, encoding="utf-8")
    dist_info = site / f"{dist_name.replace('-', '_')}-1.2.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.2.3\n")
    (dist_info / "entry_points.txt").write_text(f"[harness]\nddim = {module}\n")


def run_harness(*args, pythonpath: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_builtin_samplers_are_listed_as_plugins():
    result = invoke("plugins", "--json")
    rows = {row["name"]: row for row in json.loads(result.output)}
    for name in ("flash-lcm", "vanilla-sd", "local-student"):
        assert rows[name]["kind"] == "sampler" and rows[name]["source"] == "built-in"
        assert rows[name]["description"]
    everything = json.loads(invoke("plugins", "--all", "--json").output)
    assert {"name": "harness_plugins.flash_lcm", "kind": "plugin", "source": "built-in",
            "description": "register_samplers"} in everything


def test_third_party_distribution_is_discovered_and_benchmarked(tmp_path, embedded_model):
    site = tmp_path / "site"
    site.mkdir()
    install_distribution(site, "harness-ddim", "harness_ddim", readme_plugin_source())

    listed = run_harness("plugins", "--json", pythonpath=site, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    ddim = next(row for row in json.loads(listed.stdout) if row["name"] == "ddim")
    assert ddim == {"name": "ddim", "kind": "sampler", "source": "harness-ddim 1.2.3",
                    "description": "Base model with a DDIM scheduler and classifier-free guidance."}

    help_text = run_harness("bench", "--help", pythonpath=site, cwd=tmp_path).stdout
    assert "--ddim-eta" in help_text  # a plugin's own option joins the bench command

    outdir = tmp_path / "run"
    bench = run_harness("bench", "--sampler", "ddim", "--ddim-eta", "0.5", "--baseline_steps", "30",
                        "--seed", "3", "--outdir", outdir, "--warmup", "0", "--repeats", "1", "--quiet",
                        pythonpath=site, cwd=tmp_path)
    assert bench.returncode == 0, bench.stderr
    [record] = read_records(outdir)
    assert record["sampler"] == "ddim" and record["baseline"] is True
    assert record["config"]["sampler_options"] == {"ddim_eta": 0.5}
    assert record["sampler_info"]["scheduler"].startswith("DDIMScheduler")
    # DDIM makes exactly one UNet call per step; classifier-free guidance doubles the batch.
    assert record["unet"] == {"calls": 30, "batch_sizes": [2], "evaluations": 60, "evaluations_per_image": 60}
    assert (outdir / "baseline" / "baseline_s30_i0_seed3.png").is_file()


def test_plugin_dir_and_environment_variable(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "ddim_plugin.py").write_text(readme_plugin_source(), encoding="utf-8")
    rows = json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)
    ddim = next(row for row in rows if row["name"] == "ddim")
    assert ddim["source"] == f"file {folder / 'ddim_plugin.py'}"

    env = {**os.environ, "HARNESS_PLUGINS": str(folder)}
    listed = subprocess.run([sys.executable, "-m", "harness", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert "| ddim" in listed.stdout


def test_broken_plugin_is_reported_and_the_rest_still_load(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "broken.py").write_text("import module_that_does_not_exist\n")
    rows = json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)
    kinds = {row["name"]: row["kind"] for row in rows}
    assert kinds["broken"] == "broken" and kinds["flash-lcm"] == "sampler"
    broken = next(row for row in rows if row["name"] == "broken")
    assert "ModuleNotFoundError" in broken["description"]


def test_two_plugins_registering_one_name_is_an_error(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "clash.py").write_text(
        "import harness\nfrom harness.sampler import Sampler\n\n"
        "class Clash(Sampler):\n    name = 'flash-lcm'\n\n"
        "@harness.hookimpl\ndef register_samplers(register):\n    register(Clash)\n"
    )
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="sampler 'flash-lcm' is registered twice"):
        Registry([folder])


def test_missing_plugin_dir_is_a_clear_error(tmp_path):
    result = invoke("--plugin-dir", tmp_path / "nope", "plugins")
    assert result.exit_code == 2
    assert "plugin folder" in result.output and "does not exist" in result.output
