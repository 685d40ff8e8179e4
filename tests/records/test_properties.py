"""Property-based tests: whatever a user types or feeds in, harness accepts it or says why in one line."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.benchmark.prompts import load_prompts
from harness.cli.support import expand_multi_value
from harness.errors import HarnessError
from tests.conftest import invoke

QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@QUICK
@given(st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=8))
def test_any_list_of_steps_after_one_flag_is_planned_in_order(steps):
    result = invoke("bench", "--dry-run", "--steps", *map(str, steps))
    assert result.exit_code == 0, result.output
    planned = [task["steps"] for task in json.loads(result.output)["tasks"]]
    assert planned == list(dict.fromkeys(steps))


@QUICK
@given(st.lists(st.text(min_size=1, max_size=12), max_size=8))
def test_multi_value_expansion_never_loses_or_invents_values(args):
    expanded = expand_multi_value(args, {"--steps"})
    assert [a for a in expanded if a != "--steps"] == [a for a in args if a != "--steps"]


@QUICK
@given(st.lists(st.text(max_size=10), max_size=6))
def test_arbitrary_arguments_never_crash_bench(args):
    result = invoke("bench", "--dry-run", *args)
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 2:
        assert "Error" in result.output and "Traceback" not in result.output


@QUICK
@given(st.text(max_size=300))
def test_any_prompt_text_is_accepted_or_refused_clearly(prompt):
    result = invoke("bench", "--dry-run", "--prompt", prompt)
    if prompt.strip():
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["spec"]["prompts"] == [prompt]
    else:
        assert result.exit_code == 2 and "--prompt is empty" in result.output


@QUICK
@given(st.binary(max_size=2000))
def test_any_prompt_file_gives_prompts_or_a_clear_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_bytes(content)
    try:
        prompts = load_prompts(str(path))
    except HarnessError as error:
        assert str(error).startswith(("prompt file", "cannot read prompt file", "line "))
        assert "\n" not in str(error)
    else:
        assert prompts and all(p == p.strip() and p for p in prompts)


def test_huge_prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a blue background\n" * 200_000, encoding="utf-8")
    assert len(load_prompts(str(path))) == 200_000


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@QUICK
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3))
def test_any_caption_file_bytes_give_a_caption_or_a_counted_skip(tmp_path_factory, captions):
    from PIL import Image

    from harness.training.data import find_examples

    folder = tmp_path_factory.mktemp("data")
    for index, caption in enumerate(captions):
        Image.new("RGB", (8, 8), "red").save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_bytes(caption)
    readable = [caption for caption in captions if _utf8(caption)]
    if not readable:
        with pytest.raises(HarnessError, match="holds no usable image with a caption"):
            find_examples(None, str(folder))
        return
    examples = find_examples(None, str(folder))
    assert len(examples) == len(readable)
    assert all(caption == caption.strip() for caption in examples.captions)
    if len(readable) < len(captions):
        assert any("not UTF-8 text" in line for line in examples.skipped)


@QUICK
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_any_metadata_lines_give_examples_or_a_clear_error(tmp_path_factory, lines):
    from PIL import Image

    from harness.training.data import find_examples

    folder = tmp_path_factory.mktemp("data")
    Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    (folder / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    try:
        examples = find_examples(None, str(folder))
    except HarnessError as error:
        assert "\n" not in str(error)
    else:
        assert len(examples) >= 1
