"""Prompt text that is no text: an escaped lone surrogate in a JSONL prompt or caption file, a command-line byte that
is not UTF-8. Each is one line naming where it is and the fix, before any model loads - never a tokenizer's
TypeError naming neither."""

import pytest

from harness.benchmark.prompts import lone_surrogate, read_prompt_file
from tests.conftest import invoke

FAST = ("--steps", "1", "--warmup", "0", "--repeats", "1", "--quiet")


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\udcff", "\\ud83d", "\\ude00"])
def test_a_lone_surrogate_in_a_jsonl_prompt_is_one_line_naming_the_line_and_the_fix(tmp_path, escape):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a ' + escape + ' cat"}\n', encoding="utf-8")
    outdir = tmp_path / "run"
    result = invoke("bench", "--prompts", prompts, "--outdir", outdir, *FAST)
    assert result.exit_code == 2
    assert _errors(result.output) == [
        f"Error: line 2 of {prompts}: 'prompt' holds the escape {escape}, half of a surrogate pair without its other "
        "half, which is no character: write the character itself, or both halves of its pair (e.g. "
        '\\ud83d\\ude00); write every line of a JSONL prompt file as {"prompt": "..."} (a line is never skipped: '
        "the prompts after it would draw other seeds)."]
    assert "TypeError" not in result.output and not outdir.exists()


def test_a_whole_surrogate_pair_is_a_character(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat \\ud83d\\ude00"}\n', encoding="utf-8")
    assert read_prompt_file(prompts) == ["a cat \U0001f600"]


def test_a_lone_surrogate_in_a_jsonl_caption_file_is_one_line(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "fine"}\n{"caption": "bad \\udc00 one"}\n', encoding="utf-8")
    result = invoke("bench", "--prompts", captions, "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 2
    [error] = _errors(result.output)
    assert error.startswith(f"Error: line 2 of file '{captions}': column 'caption' holds the escape \\udc00, half of "
                            "a surrogate pair without its other half")


def test_a_prompt_argument_that_is_not_utf8_is_one_line(tmp_path):
    result = invoke("bench", "--prompt", "a caf\udce9 sign", "--outdir", tmp_path / "run", *FAST)
    assert result.exit_code == 2
    assert _errors(result.output) == [
        "Error: --prompt holds a byte that is not UTF-8 text (kept as \\udce9); set the terminal to UTF-8, or put the "
        "prompt in a UTF-8 --prompts file."]


def test_lone_surrogate_finds_halves_only():
    assert lone_surrogate("plain \u00e9 \U0001f600") is None
    assert lone_surrogate("x\ud800") == "\\ud800"
