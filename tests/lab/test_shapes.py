"""The closed shapes grammar and its data set (harness.lab.shapes), the judge on it, `harness data shapes`.

The open grammar (the default data set) is tested in tests/lab/test_scenes.py, the judge in tests/lab/test_judge.py.
"""

import errno
import os
import random
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
from PIL import Image

from harness.errors import HarnessError
from harness.lab.dataset import write_dataset
from harness.lab.judge import SUMMARY_KEYS, judge_all
from harness.lab.shapes import (
    ATTRIBUTE_NAMES,
    COLOUR_NAMES,
    POSITIONS,
    SHAPES,
    SIZE_NAMES,
    ShapeAttributes,
    all_attributes,
    caption,
    held_out_prompts,
    is_held_out,
    parse_caption,
    render,
    sample_attributes,
)
from tests.conftest import invoke

CHOICES = {"shape": len(SHAPES), "colour": len(COLOUR_NAMES), "background": len(COLOUR_NAMES),
           "position": len(POSITIONS), "size": len(SIZE_NAMES)}


def samples(count, seed):
    rng = random.Random(seed)
    return [sample_attributes(rng) for _ in range(count)]


# The grammar


def test_every_caption_parses_back_to_its_attributes():
    every = all_attributes()
    assert len(every) == 3 * 8 * 7 * 5 * 2 and len(set(map(caption, every))) == len(every)
    for attrs in every:
        assert parse_caption(caption(attrs)) == attrs


def test_caption_reads_as_documented():
    attrs = ShapeAttributes("circle", "red", "blue", "top", "small")
    assert caption(attrs) == "a small red circle at the top on a blue background"
    assert caption(ShapeAttributes("square", "white", "orange", "centre", "large")) == \
        "a large white square in the centre on an orange background"
    assert parse_caption("  A small red circle at the top  on a blue background\n") == attrs


@pytest.mark.parametrize("text", [
    "a small red circle at the top on a red background",      # shape and background the same colour
    "a small pink circle at the top on a blue background",    # unknown colour
    "a small red hexagon at the top on a blue background",    # unknown shape
    "a medium red circle at the top on a blue background",    # unknown size
    "a small red circle in the corner on a blue background",  # unknown position
    "a small red circle at the top",                          # no background
    "a cat wearing sunglasses",
    "",
])
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_attributes_outside_the_grammar_are_refused():
    with pytest.raises(ValueError, match="must differ"):
        ShapeAttributes("circle", "red", "red", "top", "small")
    with pytest.raises(ValueError, match="position"):
        ShapeAttributes("circle", "red", "blue", "middle", "small")


def test_render_is_deterministic_and_sized():
    attrs = ShapeAttributes("triangle", "green", "black", "left", "large")
    image = render(attrs, resolution=96)
    assert image.mode == "RGB" and image.size == (96, 96)
    assert image.tobytes() == render(attrs, resolution=96).tobytes()
    assert image.getpixel((0, 0)) == (20, 20, 20)  # the border is background


# The held-out split


def test_held_out_prompts_are_64_distinct_held_out_combinations():
    prompts = held_out_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64
    parsed = [parse_caption(prompt) for prompt in prompts]
    assert all(is_held_out(attrs) for attrs in parsed)
    # Balanced: every background colour and both sizes equally often, every shape and position present.
    assert set(Counter(attrs.background for attrs in parsed).values()) == {8}
    assert Counter(attrs.size for attrs in parsed) == {"small": 32, "large": 32}
    assert {attrs.shape for attrs in parsed} == set(SHAPES)
    assert {attrs.position for attrs in parsed} == set(POSITIONS)


def test_generated_captions_never_hold_a_held_out_combination():
    held_out = set(held_out_prompts())
    generated = [caption(attrs) for seed in range(3) for attrs in samples(2000, seed)]
    assert not held_out & set(generated)
    assert not any(is_held_out(parse_caption(text)) for text in generated)


def test_training_data_shows_every_part_of_each_held_out_combination():
    """Evaluation asks for new combinations, not for values or pairs training never showed."""
    training = [attrs for attrs in all_attributes() if not is_held_out(attrs)]
    seen_pairs = {(pair, tuple(getattr(attrs, name) for name in pair))
                  for attrs in training for pair in combinations(ATTRIBUTE_NAMES, 2)}
    for prompt in held_out_prompts():
        attrs = parse_caption(prompt)
        for pair in combinations(ATTRIBUTE_NAMES, 2):
            assert (pair, tuple(getattr(attrs, name) for name in pair)) in seen_pairs, (prompt, pair)


def test_sampling_is_deterministic_and_covers_the_training_combinations():
    assert samples(50, seed=4) == samples(50, seed=4)
    assert samples(50, seed=4) != samples(50, seed=5)
    drawn = set(samples(20000, seed=0))
    assert drawn == {attrs for attrs in all_attributes() if not is_held_out(attrs)}


# The data set


def test_dataset_layout_pairs_each_image_with_its_caption(tmp_path):
    out = write_dataset(tmp_path / "set", n=12, seed=3, resolution=32, grammar="closed")
    images = sorted(path.name for path in (out / "images").iterdir())
    captions = sorted(path.name for path in (out / "captions").iterdir())
    assert images == [f"{index:06d}.png" for index in range(12)]
    assert captions == [f"{index:06d}.txt" for index in range(12)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]  # no staging folder left behind
    for index in range(12):
        text = (out / "captions" / f"{index:06d}.txt").read_text(encoding="utf-8")
        attrs = parse_caption(text)
        with Image.open(out / "images" / f"{index:06d}.png") as image:
            assert image.size == (32, 32)
            assert image.convert("RGB").tobytes() == render(attrs, 32).tobytes()


def test_dataset_is_deterministic_per_n_seed_and_resolution(tmp_path):
    def files(folder):
        return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*.*"))}

    first = files(write_dataset(tmp_path / "a", n=20, seed=7, resolution=64, grammar="closed"))
    assert first == files(write_dataset(tmp_path / "b", n=20, seed=7, resolution=64, grammar="closed"))
    assert first != files(write_dataset(tmp_path / "c", n=20, seed=8, resolution=64, grammar="closed"))
    assert first != files(write_dataset(tmp_path / "e", n=20, seed=7, resolution=32, grammar="closed"))
    # A longer set starts with the shorter one.
    longer = files(write_dataset(tmp_path / "d", n=25, seed=7, resolution=64, grammar="closed"))
    assert all(longer[name] == content for name, content in first.items())


def test_interrupted_dataset_leaves_nothing_behind(tmp_path, monkeypatch):
    import harness.lab.shapes

    rendered = []

    def render_then_interrupt(attrs, resolution):
        rendered.append(attrs)
        if len(rendered) > 3:
            raise KeyboardInterrupt
        return render(attrs, resolution)

    monkeypatch.setattr(harness.lab.shapes, "render", render_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "set", n=50, seed=0, resolution=32, grammar="closed")
    assert len(rendered) == 4
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_in_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(HarnessError, match="No space left on device; free some space"):
        write_dataset(tmp_path / "set", n=5, seed=0, resolution=32)
    assert list(tmp_path.iterdir()) == []


def test_dataset_goes_into_an_empty_folder_but_not_a_full_one(tmp_path):
    (tmp_path / "empty").mkdir()
    write_dataset(tmp_path / "empty", n=2, seed=0, resolution=32)
    with pytest.raises(HarnessError, match="not an empty folder"):
        write_dataset(tmp_path / "empty", n=2, seed=0, resolution=32)


# The judge on closed captions (its thresholds are fixed in tests/lab/test_judge.py)


@pytest.fixture(scope="module")
def rendered():
    attrs = samples(300, seed=11)
    return [render(a) for a in attrs], [caption(a) for a in attrs]


def test_judge_is_right_on_ground_truth_renders(rendered):
    images, captions = rendered
    summary = judge_all(zip(images, captions))
    # A closed caption states every attribute of one object.
    assert set(summary) == {*SUMMARY_KEYS, "n"} and summary["n"] == 300
    low = {name: value for name, value in summary.items() if name != "n" and value < 0.99}
    assert not low, f"below 0.99: {low}"


def test_judge_is_near_chance_on_shuffled_captions(rendered):
    images, captions = rendered
    shuffled = captions[1:] + captions[:1]  # every image gets another, independently drawn caption
    summary = judge_all(zip(images, shuffled))
    for name, choices in CHOICES.items():
        # 300 draws: a binomial's standard deviation is at most 0.029 here.
        assert abs(summary[name] - 1 / choices) < 0.09, (name, summary[name])
    # Every picture is one solid object, as every closed caption asks: commitment is right, the attributes not.
    assert summary["commitment"] == 1.0
    assert summary["overall"] < 0.7


# The command


def test_cli_writes_the_data_set(tmp_path):
    out = tmp_path / "shapes"
    result = invoke("data", "shapes", "--out", out, "--n", 5, "--seed", 2, "--resolution", 32)
    assert result.exit_code == 0, result.output
    assert "wrote 5 images" in result.output
    assert len(list((out / "images").glob("*.png"))) == len(list((out / "captions").glob("*.txt"))) == 5
    same = write_dataset(tmp_path / "api", n=5, seed=2, resolution=32)
    assert (out / "images" / "000004.png").read_bytes() == (same / "images" / "000004.png").read_bytes()


@pytest.mark.parametrize("arguments, message", [
    (["--n", "0"], "--n 0: the number of images must be at least 1."),
    (["--resolution", "60"], "--resolution 60 must be a multiple of 8 and at least 32; pick e.g. 64."),
    (["--resolution", "24"], "--resolution 24 must be a multiple of 8 and at least 32; pick e.g. 64."),
])
def test_cli_refuses_bad_input_in_one_line(tmp_path, arguments, message):
    result = invoke("data", "shapes", "--out", tmp_path / "set", *arguments)
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"
    assert not (tmp_path / "set").exists()


def test_cli_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = invoke("data", "shapes", "--out", tmp_path, "--n", 2)
    assert result.exit_code == 2
    assert result.output == (f"Error: --out '{tmp_path}' already exists and is not an empty folder; "
                             "pass a new --out.\n")
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
