"""Plugin discovery: built-ins, an installed third-party distribution, plugin folders, broken plugins."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness.hooks.registry import Registry
from tests.conftest import invoke, record_json

SAMPLER_GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "samplers.md"


def guide_plugin_source() -> str:
    """The complete plugin shown in the sampler guide of the docs (docs/plugins/samplers.md): its first Python block."""
    page = SAMPLER_GUIDE.read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", page, re.S).group(1)


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


@pytest.mark.slow
def test_third_party_distribution_is_discovered_and_benchmarked(tmp_path, embedded_model):
    site = tmp_path / "site"
    site.mkdir()
    install_distribution(site, "harness-ddim", "harness_ddim", guide_plugin_source())

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
    [record] = record_json(outdir)
    assert record["sampler"] == "ddim" and record["baseline"] is True
    assert record["config"]["sampler_options"] == {"ddim": {"ddim_eta": 0.5}}  # only its own sampler's
    # The record names every plugin that was loaded: its distribution and version, the built-ins' too.
    plugins = record["environment"]["plugins"]
    assert plugins["ddim"] == {"source": "harness-ddim 1.2.3", "distribution": "harness-ddim", "version": "1.2.3"}
    assert plugins["harness_plugins.flash_lcm"] == {"source": "built-in", "distribution": "fewstep-harness",
                                                    "version": harness.__version__}
    assert record["sampler_info"]["scheduler"].startswith("DDIMScheduler")
    # DDIM makes exactly one UNet call per step; classifier-free guidance doubles the batch.
    assert record["unet"] == {"calls": 30, "batch_sizes": [2], "evaluations": 60, "evaluations_per_image": 60}
    assert (outdir / "baseline" / "baseline_s30_i0_seed3.png").is_file()


def test_plugin_dir_and_environment_variable(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "ddim_plugin.py").write_text(guide_plugin_source(), encoding="utf-8")
    rows = json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)
    ddim = next(row for row in rows if row["name"] == "ddim")
    assert ddim["source"] == f"file {folder / 'ddim_plugin.py'}"

    env = {**os.environ, "HARNESS_PLUGINS": str(folder)}
    listed = subprocess.run([sys.executable, "-m", "harness", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert "| ddim" in listed.stdout


def test_the_environment_names_a_loose_plugin_file_without_a_distribution_and_leaves_out_a_broken_one(tmp_path):
    import torch

    from harness.hooks.registry import Registry
    from harness.records.environment import environment

    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "ddim_plugin.py").write_text(guide_plugin_source(), encoding="utf-8")
    (folder / "broken_plugin.py").write_text("raise ImportError('no such thing')\n", encoding="utf-8")
    plugins = environment(torch.device("cpu"), torch.float32, Registry([folder]).pm)["plugins"]
    assert plugins["ddim_plugin"] == {"source": f"file {folder / 'ddim_plugin.py'}", "distribution": None,
                                      "version": None}
    assert "broken_plugin" not in plugins
    assert plugins["harness_plugins.tcd"]["distribution"] == "fewstep-harness"


def test_broken_plugin_is_reported_and_the_rest_still_load(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "broken.py").write_text("import module_that_does_not_exist\n")
    rows = json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)
    kinds = {row["name"]: row["kind"] for row in rows}
    assert kinds["broken"] == "broken" and kinds["flash-lcm"] == "sampler"
    broken = next(row for row in rows if row["name"] == "broken")
    assert "ModuleNotFoundError" in broken["description"]


COMPLETE_SAMPLER = (
    "import harness\nfrom harness.benchmark.sampler import DiffusersSampler\n\n"
    "class Clash(DiffusersSampler):\n    name = {name!r}\n    description = 'a sampler'\n\n"
    "@harness.hookimpl\ndef register_samplers(register):\n    register(Clash)\n"
)


def write_plugin(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    return folder


def test_two_plugins_registering_one_name_break_only_the_second(tmp_path):
    folder = write_plugin(tmp_path / "plugins", "clash", COMPLETE_SAMPLER.format(name="flash-lcm"))
    registry = Registry([folder])
    assert registry.sampler("flash-lcm").source == "built-in"
    [broken] = registry.broken()
    assert broken.name == "clash"
    assert broken.error == ("register_samplers: sampler 'flash-lcm' is registered twice (built-in and "
                            f"file {folder / 'clash.py'}); uninstall one of the plugins")


def test_a_plugin_whose_hook_raises_is_broken_and_the_rest_work(tmp_path):
    folder = write_plugin(tmp_path / "plugins", "raises", (
        "import harness\nfrom harness.benchmark.sampler import DiffusersSampler\n\n"
        "class Half(DiffusersSampler):\n    name = 'half'\n    description = 'registered before the failure'\n\n"
        "@harness.hookimpl\ndef register_samplers(register):\n    register(Half)\n"
        "    raise RuntimeError('plugin bug')\n\n"
        "@harness.hookimpl\ndef harness_machine_info(info):\n    info['raises'] = 'never'\n"))
    rows = {row["name"]: row for row in json.loads(invoke("--plugin-dir", folder, "plugins", "--json").output)}
    assert rows["raises"]["kind"] == "broken"
    assert rows["raises"]["description"] == "register_samplers: RuntimeError: plugin bug"
    assert "half" not in rows and rows["flash-lcm"]["kind"] == "sampler"
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "half", "--dry-run")
    assert result.exit_code == 2
    assert result.output == (f"Error: sampler 'half' comes from the plugin 'raises' (file {folder / 'raises.py'}), "
                             "which is broken (register_samplers: RuntimeError: plugin bug); fix or uninstall that "
                             "plugin.\n")
    registry = Registry([folder])
    assert registry.pm.get_plugin("raises") is None  # its other hooks (machine info) no longer run


@pytest.mark.parametrize("body, missing", [
    ("class Bad(Sampler):\n    name = 'bad'\n    description = 'd'\n",
     "sampler class Bad does not implement describe, generate, load"),
    ("class Bad(DiffusersSampler):\n    name = 'bad'\n", "sampler class Bad does not set description"),
    ("class Bad:\n    name = 'bad'\n    description = 'd'\n", "is not a subclass of harness.benchmark.sampler.Sampler"),
    ("class Bad(DiffusersSampler):\n    name = 'bad'\n    description = 'd'\n    Options = dict\n",
     "sampler class Bad has Options <class 'dict'>, not a dataclass subclass of harness.options.Options"),
])
def test_a_class_that_breaks_its_contract_is_refused_with_what_it_lacks(tmp_path, body, missing):
    source = ("import harness\nfrom harness.benchmark.sampler import DiffusersSampler, Sampler\n\n" + body +
              "\n@harness.hookimpl\ndef register_samplers(register):\n    register(Bad)\n")
    folder = write_plugin(tmp_path / "plugins", "contract", source)
    [broken] = Registry([folder]).broken()
    assert missing in broken.error
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "bad", "--dry-run")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "comes from the plugin 'contract'" in result.output and missing in result.output


def test_an_unknown_sampler_points_at_broken_plugins(tmp_path):
    folder = write_plugin(tmp_path / "plugins", "broken", "import module_that_does_not_exist\n")
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "nope", "--dry-run")
    assert result.exit_code == 2
    assert "unknown sampler 'nope'" in result.output
    assert "Broken plugins that may provide it: 'broken' (see `harness plugins`)." in result.output


def test_hook_tracing_shows_the_register_hooks(tmp_path):
    env = {**os.environ, "HARNESS_TRACE_HOOKS": "1"}
    listed = subprocess.run([sys.executable, "-m", "harness", "plugins"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert listed.returncode == 0
    for hook in ("register_samplers", "register_trainers", "register_metrics", "register_commands"):
        assert f"{hook} [hook]" in listed.stderr


def test_an_option_of_a_sampler_the_run_does_not_use_is_refused(tmp_path):
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "ddim_plugin.py").write_text(guide_plugin_source(), encoding="utf-8")
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "flash-lcm", "--ddim-eta", "0.5", "--dry-run")
    assert result.exit_code == 2
    assert result.output == ("Error: --ddim-eta is an option of sampler 'ddim', which this run does not use; "
                             "add --sampler ddim, or leave the option out.\n")
    planned = json.loads(invoke("--plugin-dir", folder, "bench", "--sampler", "ddim", "--ddim_eta", "0.5",
                                "--dry-run").output)
    assert planned["spec"]["sampler_options"] == {"ddim": {"ddim_eta": 0.5}}


def test_missing_plugin_dir_is_a_clear_error(tmp_path):
    result = invoke("--plugin-dir", tmp_path / "nope", "plugins")
    assert result.exit_code == 2
    assert "plugin folder" in result.output and "does not exist" in result.output
