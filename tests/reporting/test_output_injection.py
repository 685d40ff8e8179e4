"""Text from users and records cannot forge markdown cells, drive the terminal, or name a file above --outdir.

summary.md, leaderboard.md and compare's tables keep one row per record and their columns whatever the sampler
names, labels, LoRA folders, errors and environment fields hold; warnings and errors printed to the terminal show
control characters escaped; plugin names that would be paths are refused when the plugin registers them.
"""

import dataclasses
import json
import re

import pytest

from harness.hooks.registry import Registry
from harness.records.store import SUMMARY_FILE
from tests.conftest import invoke, make_record
from tests.hooks.test_plugins import COMPLETE_SAMPLER, write_plugin
from tests.reporting.test_compare import write_run

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")
FORGED = "x | forged | cells\n| 1 | 2 | 3 |\n# Forged heading \x1b]0;pwned\x07"
CONFIG = {"model": "embedded", "prompts": ["a cat"], "num_images": 1, "seed": 42, "warmup": 0, "repeats": 5}


def _tables(markdown: str) -> list[list[str]]:
    """Each table of a markdown text as its lines."""
    tables, current = [], []
    for line in markdown.split("\n"):
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _assert_intact(table: list[str], rows: int) -> None:
    assert len(table) == rows + 2, table
    separators = {len(UNESCAPED_PIPE.findall(line)) for line in table}
    assert len(separators) == 1, table  # every line has the header's columns


def _hostile_records():
    lora = make_record("flash-lcm", 2, 0.1, config=CONFIG)
    info = {**lora.measured.sampler_info, "lora": "/loras/a|b\nc"}
    return [
        make_record("vanilla-sd", 30, 2.0, baseline=True, guidance_scale=7.5, config=CONFIG,
                    metrics={"fid|x\ny": {"value": 1.0, "higher_is_better": False}}),
        dataclasses.replace(lora, measured=dataclasses.replace(lora.measured, sampler_info=info)),
        make_record("flash|lcm\n| evil |", 4, 0.2, config=CONFIG),
        make_record("flash-lcm", 8, error=FORGED, config=CONFIG),
    ]


def test_summary_md_keeps_its_table_whatever_the_records_hold(tmp_path):
    records = _hostile_records()
    records[0] = dataclasses.replace(records[0], environment={**records[0].environment,
                                                              "device_name": "cpu\n# Forged | heading"},
                                     config={**records[0].config, "model": "emb`edded\n# forged"})
    run = write_run(tmp_path / "run", records)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    summary = (run / SUMMARY_FILE).read_text()
    assert not any(line.startswith("# Forged") or line.startswith("# forged") for line in summary.split("\n"))
    assert not CONTROL.search(summary)
    timing, stages = _tables(summary)
    _assert_intact(timing, len(records))
    _assert_intact(stages, 3)
    _assert_intact(_tables(result.output)[0], len(records))  # the table printed to the terminal too
    assert not CONTROL.search(result.output)


def test_leaderboard_md_keeps_its_table_whatever_labels_and_loras_hold(tmp_path):
    scored = []
    for record in _hostile_records():
        if record.measured is not None:
            metrics = {"fidelity": {"value": 0.5, "higher_is_better": True}}
            record = dataclasses.replace(record, measured=dataclasses.replace(record.measured, metrics=metrics))
        scored.append(record)
    run = write_run(tmp_path / "run", scored)
    result = invoke("leaderboard", run, "--label", f"{run}=my | label\n# forged\x1b[2J", "--outdir", tmp_path / "board")
    assert result.exit_code == 0, result.output
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    assert not CONTROL.search(board) and "\n# forged" not in board
    [table] = _tables(board)
    _assert_intact(table, 3)
    assert not CONTROL.search(result.output)


def test_compare_tables_keep_their_cells(tmp_path):
    a = write_run(tmp_path / "a", _hostile_records())
    b = write_run(tmp_path / "b", _hostile_records())
    result = invoke("compare", a, b)
    assert result.exit_code == 0, result.output
    compared, not_compared = _tables(result.output)
    _assert_intact(compared, 3)
    _assert_intact(not_compared, 2)
    assert not CONTROL.search(result.output)


def test_a_prompt_cannot_drive_the_terminal_through_a_warning(tmp_path, embedded_model):
    prompts = tmp_path / "prompts.jsonl"
    long = " ".join(["circle"] * 90)
    prompts.write_text(json.dumps({"prompt": "\x1b]0;pwned\x07\x1b[2J\rError: forged " + long}) + "\n")
    result = invoke("bench", "--prompts", prompts, "--steps", "1", "--outdir", tmp_path / "run", "--warmup", "0",
                    "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning: the prompt")]
    assert warnings and warnings[0].startswith("Warning: the prompt '\\x1b]0;pwned\\x07\\x1b[2J\\rError: forged")
    assert not CONTROL.search(result.output)
    assert not any(line.startswith("Error:") for line in result.output.splitlines())


def test_an_error_quoting_a_hostile_path_is_one_escaped_line(tmp_path):
    hostile = tmp_path / "lora\x1b]0;pwned\x07\nError: forged"
    result = invoke("bench", "--lora_path", hostile, "--steps", "1", "--outdir", tmp_path / "run", "--quiet")
    assert result.exit_code != 0
    [line] = [line for line in result.output.splitlines() if "Error:" in line]
    assert line.startswith("Error: ") and "lora\\x1b]0;pwned\\x07" in line, result.output
    assert "Error: forged" not in result.output.splitlines()
    assert not CONTROL.search(result.output)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "a\x1b]0;x\x07", "two words"])
def test_a_plugin_sampler_whose_name_is_a_path_is_refused_at_registration(tmp_path, name):
    folder = write_plugin(tmp_path / "plugins", "pathy", COMPLETE_SAMPLER.format(name=name))
    [broken] = Registry([folder]).broken()
    assert broken.name == "pathy" and "register_samplers: sampler class Clash: sampler name" in broken.error
    assert "\n" not in broken.error
    outdir = tmp_path / "deep" / "run"
    result = invoke("--plugin-dir", folder, "bench", "--sampler", name, "--compare_baseline", "--steps", "1",
                    "--outdir", outdir)
    assert result.exit_code == 2 and "comes from the plugin 'pathy'" in result.output
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escape").exists()
    assert not CONTROL.search(result.output)


def test_a_file_label_that_is_a_path_is_refused(tmp_path):
    source = COMPLETE_SAMPLER.format(name="fine").replace("description = 'a sampler'",
                                                         "description = 'a sampler'\n    file_label = '../up'")
    folder = write_plugin(tmp_path / "plugins", "labelled", source)
    [broken] = Registry([folder]).broken()
    assert "sampler file_label name '../up' holds a path separator" in broken.error
