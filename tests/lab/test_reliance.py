"""Caption reliance (harness.lab.reliance): swapped captions, the examples probed, the measure itself."""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from harness.lab import scenes
from harness.lab.dataset import write_dataset
from harness.lab.reliance import ATTRIBUTES, caption_reliance, probe_examples, swap
from harness.models.embedded import embedded_model

SCRIPT = Path(__file__).parents[2] / "scripts" / "caption_reliance.py"


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_swap_changes_that_attribute_and_nothing_else(attribute):
    rng = random.Random(0)
    texts = ["a small red circle at the top on a blue background", "two large green squares on a white background",
             "three purple triangles on a black background", "a large orange shape in the centre"]
    swapped_any = False
    for text in texts:
        for _ in range(20):
            swapped = swap(text, attribute, rng)
            before = scenes.parse(text)
            if getattr(before, attribute) is None:
                assert swapped is None
                continue
            if swapped is None:  # only a count beside a position has no other value
                assert attribute == "count" and before.position is not None
                continue
            swapped_any = True
            after = scenes.parse(swapped)
            assert getattr(after, attribute) != getattr(before, attribute)
            assert all(getattr(after, name) == getattr(before, name) for name in ATTRIBUTES if name != attribute)
            assert after.colour is None or after.colour != after.background
    assert swapped_any


def test_captions_outside_the_grammar_are_not_swapped():
    assert swap("a photo of a cat", "colour", random.Random(0)) is None
    assert swap("", "shape", random.Random(0)) is None


def test_probe_examples_take_the_first_captions_that_state_each_attribute():
    captions = ["a red circle", "a photo of a cat", "two squares", "a small blue shape on the left",
                "three triangles on a white background"]
    examples = probe_examples(captions, per_attribute=2)
    assert [index for index, _ in examples["colour"]] == [0, 3]
    assert [index for index, _ in examples["shape"]] == [0, 2]
    assert [index for index, _ in examples["position"]] == [3]
    assert [index for index, _ in examples["background"]] == [4]
    assert [index for index, _ in examples["count"]] == [0, 2]  # the position caption keeps its single object
    assert "size" in examples and all(index != 1 for pairs in examples.values() for index, _ in pairs)
    assert probe_examples(["a photo of a cat"], per_attribute=4) == {}


def test_reliance_is_the_loss_increase_a_wrong_word_causes():
    """A stand-in model that reads the colour word and ignores the shape word: reliance shows exactly that."""
    colours = {name: float(index) for index, name in enumerate(("red", "blue", "green", "white", "black", "orange",
                                                                "yellow", "purple"))}
    truth = {}

    def loss(latents, captions, timesteps, noise):
        # The loss of predicting the example's true colour value from the colour its caption says.
        said = torch.tensor([colours[scenes.parse(text).colour] for text in captions])
        return 1.0 + (said - latents.flatten(1)[:, 0]) ** 2 + 0 * timesteps + 0 * noise.flatten(1)[:, 0]

    captions = [f"a {colour} {shape}" for colour in ("red", "blue", "green") for shape in ("circle", "square")]
    for index, text in enumerate(captions):
        truth[index] = colours[scenes.parse(text).colour]

    def latents(indices):
        return torch.tensor([truth[index] for index in indices]).view(-1, 1, 1, 1).expand(-1, 4, 2, 2)

    examples = probe_examples(captions, per_attribute=6, attributes=("colour", "shape"))
    reliance = caption_reliance(loss, latents, captions, examples, num_timesteps=1000)
    assert reliance["shape"] == pytest.approx(0.0)
    assert reliance["colour"] > 1.0  # every wrong colour is at least one step away: loss 1 -> 2 or more


def test_the_script_prints_the_shipped_teachers_reliance_row(tmp_path):
    """scripts/caption_reliance.py on the shipped model: one row, and the model reads the background word."""
    data = write_dataset(tmp_path / "data", n=12, seed=0)
    result = subprocess.run([sys.executable, str(SCRIPT), str(data), str(embedded_model()), "--examples", "12"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    header, rule, row = result.stdout.strip().splitlines()
    assert header == "| model | count | shape | colour | size | position | background |"
    values = [float(cell.strip().rstrip("%")) for cell in row.strip("|").split("|")[1:]]
    assert len(values) == 6 and values[5] > 50  # a wrong background colour is the costliest word


def test_the_script_refuses_data_without_shapes_captions(tmp_path):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.txt").write_text("a photo of a cat")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "data"), "unused"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0 and "no caption" in result.stderr and "Traceback" not in result.stderr
