"""Plugins that misbehave while loading: they cannot end the process, take a built-in's name, be dropped silently,
or write into machine-readable output.

sys.exit() at import, in a hook or in a sampler's code is a broken plugin or a failed measurement named in one line;
two plugin folders holding files of the same name both load; a plugin command under a built-in's (or another
plugin's) name is refused and the built-in stays; what plugins print goes to stderr when stdout carries --json.
"""

import json

import pytest

from harness.hooks.registry import Registry
from tests.conftest import invoke, record_json
from tests.hooks.test_plugins import COMPLETE_SAMPLER, write_plugin

BENCH = ("--steps", "1", "--warmup", "0", "--repeats", "1", "--quiet")
EXITS = ["sys.exit()", "sys.exit(0)", "sys.exit(3)", "raise SystemExit('bye')"]


def _rows(result) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(result.stdout)}


@pytest.mark.parametrize("exit_call", EXITS)
def test_sys_exit_at_import_is_a_broken_plugin_named_in_one_line(tmp_path, exit_call):
    folder = write_plugin(tmp_path / "plugins", "quitter", f"import sys\n{exit_call}\n")
    result = invoke("--plugin-dir", folder, "plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = _rows(result)
    assert rows["quitter"]["kind"] == "broken"
    assert rows["quitter"]["description"].startswith("it called sys.exit(")
    assert "which a plugin may not do" in rows["quitter"]["description"]
    assert rows["flash-lcm"]["kind"] == "sampler"  # everything else still loads


@pytest.mark.parametrize("exit_call", EXITS)
def test_sys_exit_in_a_register_hook_breaks_only_that_plugin(tmp_path, exit_call):
    source = COMPLETE_SAMPLER.format(name="quits").replace("    register(Clash)\n",
                                                           f"    import sys\n    {exit_call}\n")
    folder = write_plugin(tmp_path / "plugins", "quitter", source)
    [broken] = Registry([folder]).broken()
    assert broken.error.startswith("register_samplers: it called sys.exit(")
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "quits", "--outdir", tmp_path / "run", *BENCH)
    assert result.exit_code == 2  # never 0 having done nothing
    assert result.output.startswith("Error: unknown sampler 'quits'") or "comes from the plugin" in result.output
    assert not (tmp_path / "run").exists()


def test_sys_exit_in_a_machine_info_hook_stops_bench_with_one_line_not_exit_0(tmp_path, embedded_model):
    folder = write_plugin(tmp_path / "plugins", "quitter", (
        "import sys\nimport harness\n\n@harness.hookimpl\ndef harness_machine_info(info):\n    sys.exit(0)\n"))
    outdir = tmp_path / "run"
    result = invoke("--plugin-dir", folder, "bench", "--outdir", outdir, *BENCH)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: the plugin 'quitter' failed in harness_machine_info: it called sys.exit(0), which a plugin may not "
        "do (harness would end, saying nothing); fix or uninstall that plugin.")
    assert not outdir.exists()


def test_sys_exit_in_a_sampler_fails_its_measurement_not_the_process(tmp_path, embedded_model):
    source = (
        "import sys\nimport harness\nfrom harness_plugins.flash_lcm import FlashLcmSampler\n\n"
        "class Quits(FlashLcmSampler):\n    name = 'quits'\n    description = 'exits while generating'\n"
        "    def generate(self, request):\n        sys.exit(0)\n\n"
        "@harness.hookimpl\ndef register_samplers(register):\n    register(Quits)\n")
    folder = write_plugin(tmp_path / "plugins", "quitter", source)
    outdir = tmp_path / "run"
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "quits", "--sampler", "flash-lcm", "--outdir",
                    outdir, *BENCH)
    assert result.exit_code == 1, result.output
    assert "Error: quits (1 steps): it called sys.exit(0), which a plugin may not do" in result.output
    assert {record["sampler"]: record["status"] for record in record_json(outdir)} == {"quits": "failed",
                                                                                        "flash-lcm": "ok"}


def test_two_plugin_folders_with_files_of_one_name_both_load(tmp_path):
    first = write_plugin(tmp_path / "a", "samplers", COMPLETE_SAMPLER.format(name="from-a"))
    second = write_plugin(tmp_path / "b", "samplers", COMPLETE_SAMPLER.format(name="from-b"))
    registry = Registry([first, second])
    assert registry.broken() == []
    assert registry.sampler("from-a").source == f"file {first / 'samplers.py'}"
    assert registry.sampler("from-b").source == f"file {second / 'samplers.py'}"
    assert {"samplers", str(second / "samplers.py")} <= set(registry.plugins)
    rows = _rows(invoke("--plugin-dir", first, "--plugin-dir", second, "plugins", "--json"))
    assert rows["from-a"]["kind"] == rows["from-b"]["kind"] == "sampler"


def test_the_same_folder_given_twice_loads_once(tmp_path):
    folder = write_plugin(tmp_path / "a", "samplers", COMPLETE_SAMPLER.format(name="once"))
    registry = Registry([folder, folder, tmp_path / "a" / "."])
    assert registry.broken() == [] and registry.sampler("once")


COMMAND = ("import click\nimport harness\n\n@click.command({name!r})\ndef command():\n"
           "    click.echo('the plugin ran')\n\n@harness.hookimpl\ndef register_commands(cli):\n"
           "    cli.add_command(command)\n")


@pytest.mark.parametrize("name", ["bench", "eval", "report", "train", "plugins", "compare", "leaderboard", "data"])
def test_a_plugin_command_cannot_replace_a_built_in_one(tmp_path, name):
    folder = write_plugin(tmp_path / "plugins", "usurper", COMMAND.format(name=name))
    result = invoke("--plugin-dir", folder, name, "--help")
    assert result.exit_code == 0, result.output
    assert "the plugin ran" not in result.output  # the built-in's help, not the plugin's command
    warning = [line for line in result.output.splitlines() if line.startswith("Warning: the plugin 'usurper'")]
    assert warning == [f"Warning: the plugin 'usurper' (file {folder / 'usurper.py'}) is broken: register_commands: "
                       f"command '{name}' is already a harness command; a plugin cannot replace it: name yours "
                       "otherwise; fix or uninstall that plugin (see `harness plugins`)."]
    rows = _rows(invoke("--plugin-dir", folder, "plugins", "--json"))
    assert rows["usurper"]["kind"] == "broken"


def test_a_second_plugin_cannot_take_a_plugin_commands_name_and_a_command_name_must_be_a_word(tmp_path):
    folder = tmp_path / "plugins"
    write_plugin(folder, "a_first", COMMAND.format(name="hello"))
    write_plugin(folder, "b_second", COMMAND.format(name="hello"))
    write_plugin(folder, "c_path", COMMAND.format(name="../hello"))
    result = invoke("--plugin-dir", folder, "hello")
    assert result.exit_code == 0 and "the plugin ran" in result.output
    errors = {info.name: info.error for info in _registry_after_commands(folder).broken()}
    assert errors["b_second"].startswith("register_commands: command 'hello' is already a harness command")
    assert errors["c_path"].startswith("register_commands: command name '../hello' holds a path separator")
    assert "a_first" not in errors


def _registry_after_commands(folder):
    from harness.hooks.registry import get_registry

    invoke("--plugin-dir", folder, "plugins")  # the CLI adds plugin commands on its first use
    return get_registry([folder])


def test_a_plugin_printing_while_it_loads_does_not_corrupt_json_output(tmp_path):
    folder = write_plugin(tmp_path / "plugins", "chatty", (
        "import harness\nprint('hello from chatty at import')\n\n@harness.hookimpl\n"
        "def register_commands(cli):\n    print('hello from register_commands')\n"))
    result = invoke("--plugin-dir", folder, "plugins", "--all", "--json")
    assert result.exit_code == 0
    assert _rows(result)["chatty"]["kind"] == "plugin"  # stdout is JSON alone
    assert "hello from chatty at import" in result.stderr and "hello from register_commands" in result.stderr


def test_bench_json_stays_json_whatever_plugins_print_while_it_runs(tmp_path, embedded_model):
    source = (
        "import harness\nfrom harness_plugins.flash_lcm import FlashLcmSampler\nprint('import chatter')\n\n"
        "class Chatty(FlashLcmSampler):\n    name = 'chatty'\n    description = 'prints while it works'\n"
        "    def generate(self, request):\n        print('generate chatter')\n"
        "        return super().generate(request)\n\n"
        "@harness.hookimpl\ndef register_samplers(register):\n    print('register chatter')\n    register(Chatty)\n\n"
        "@harness.hookimpl\ndef harness_machine_info(info):\n    print('machine info chatter')\n")
    folder = write_plugin(tmp_path / "plugins", "chatty", source)
    result = invoke("--plugin-dir", folder, "bench", "--sampler", "chatty", "--json", "--outdir", tmp_path / "run",
                    *BENCH)
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.stdout)
    assert record["sampler"] == "chatty" and record["status"] == "ok"
    for chatter in ("import", "register", "machine info", "generate"):
        assert f"{chatter} chatter" in result.stderr


def test_sys_exit_in_a_trainer_is_one_line_not_exit_0(tmp_path, embedded_model):
    from tests.training.test_train_data import write_shapes

    source = ("import sys\nimport harness\nfrom harness_plugins.distill import DistillTrainer\n\n"
              "class Quits(DistillTrainer):\n    name = 'quits'\n    description = 'exits in setup'\n"
              "    def setup(self):\n        sys.exit(0)\n\n"
              "@harness.hookimpl\ndef register_trainers(register):\n    register(Quits)\n")
    folder = write_plugin(tmp_path / "plugins", "quitter", source)
    shapes = write_shapes(tmp_path / "data", count=2)
    result = invoke("--plugin-dir", folder, "train", "--plugin", "quits", "--data_dir", shapes, "--output_dir",
                    tmp_path / "out", "--run_name", "run", "--model", "embedded", "--max_steps", "1")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: trainer 'quits' stopped: it called sys.exit(0), which a plugin may not do (harness would end, saying "
        "nothing); fix or uninstall that plugin.")
