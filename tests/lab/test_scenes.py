"""The open-caption grammar of the shapes data set (harness.lab.scenes) and `harness data shapes --grammar`."""

import random
from collections import Counter
from itertools import combinations, product
from pathlib import Path

import pytest
from PIL import Image

from harness.errors import HarnessError
from harness.lab import scenes, shapes
from harness.lab.dataset import write_dataset
from harness.lab.judge import judge
from harness.lab.scenes import (
    COUNTS,
    GAP,
    HELD_OUT,
    MARGIN,
    SIDES,
    Caption,
    ShapeObject,
    caption_rng,
    draw_scene,
    held_out_prompts,
    nearest_anchor,
    parse,
    render_scene,
    sample_caption,
)
from harness.lab.shapes import ANCHORS, COLOUR_NAMES, POSITIONS, SHAPES, SIZE_NAMES
from tests.conftest import invoke


def every_caption():
    """Every caption the grammar allows, in a fixed order."""
    captions = []
    for count, shape, colour, size, position, background in product(
            COUNTS, (None, *SHAPES), (None, *COLOUR_NAMES), (None, *SIZE_NAMES), (None, *POSITIONS),
            (None, *COLOUR_NAMES)):
        if (colour is not None and colour == background) or (position is not None and count != 1):
            continue
        captions.append(Caption(count, shape, colour, size, position, background))
    return captions


def training(count, seed):
    """``count`` training (caption, scene) pairs, drawn as ``write_dataset`` draws them."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        caption = sample_caption(rng)
        pairs.append((caption, draw_scene(caption, rng)))
    return pairs


def files(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(Path(folder).rglob("*.*"))}


# The grammar


def test_every_caption_reads_back_as_itself():
    captions = every_caption()
    texts = [caption.text() for caption in captions]
    assert len(set(texts)) == len(captions) > 5000
    for caption, text in zip(captions, texts):
        assert parse(text) == caption, text


def test_sampled_captions_read_back_as_themselves():
    rng = random.Random(0)
    for _ in range(2000):
        caption = sample_caption(rng)
        assert parse(caption.text()) == caption
        assert parse("  " + caption.text().upper().replace(" ", "  ") + "\n") == caption


def test_captions_read_as_documented():
    assert Caption(2, "square", "blue", background="white").text() == "two blue squares on a white background"
    assert Caption(1, size="large", position="top").text() == "a large shape at the top"
    assert Caption(3, "triangle").text() == "three triangles"
    assert Caption(1, "square", "orange").text() == "an orange square"
    assert Caption(1, "square", "orange", "large").text() == "a large orange square"
    assert Caption(2, background="orange").text() == "two shapes on an orange background"
    assert Caption(1, "circle", background="orange").text() == "a circle on an orange background"
    assert parse("an orange square") == Caption(1, "square", "orange")
    assert parse("two shapes on an orange background") == Caption(2, background="orange")


def test_closed_captions_are_count_one_captions_with_everything_stated():
    for attrs in shapes.all_attributes():
        caption = parse(shapes.caption(attrs))
        assert caption == Caption(1, attrs.shape, attrs.colour, attrs.size, attrs.position, attrs.background)
        assert caption.open == () and caption.stated == scenes.OPEN_ATTRIBUTES


@pytest.mark.parametrize("text", [
    "two red circle",                       # plural count, singular noun
    "three shape",
    "a red circles",                        # singular count, plural noun
    "an orange squares",
    "a red circle on a red background",     # objects and background the same colour
    "two circles on the left",              # a position for several objects
    "three red squares at the top on a blue background",
    "four circles",                         # counts are one to three
    "a pink circle",                        # unknown colour
    "a hexagon",                            # unknown shape
    "a medium circle",                      # unknown size
    "a circle in the corner",               # unknown position
    "a red small circle",                   # words out of order
    "red circle",                           # no count
    "the red circle",
    "a circle on a blue",
    "a cat wearing sunglasses",
    "",
])
def test_text_outside_the_grammar_is_refused(text):
    with pytest.raises(ValueError):
        parse(text)


def test_a_plural_mismatch_says_which_noun_it_needs():
    with pytest.raises(ValueError, match="plural 'circles'"):
        parse("two red circle")
    with pytest.raises(ValueError, match="singular 'circle'"):
        parse("a red circles")


def test_captions_outside_the_grammar_are_refused():
    with pytest.raises(ValueError, match="must differ"):
        Caption(1, colour="red", background="red")
    with pytest.raises(ValueError, match="single object"):
        Caption(2, position="left")
    for bad in (dict(count=0), dict(count=4), dict(count=1, shape="hexagon"), dict(count=1, colour="pink"),
                dict(count=1, size="medium"), dict(count=1, position="middle"), dict(count=1, background="grey")):
        with pytest.raises(ValueError):
            Caption(**bad)


def test_open_attributes_are_what_the_caption_leaves_unsaid():
    assert Caption(1).open == scenes.OPEN_ATTRIBUTES and Caption(1).stated == ()
    # Several objects: no position can be stated, and their layout is always open.
    assert Caption(2).open == scenes.OPEN_ATTRIBUTES
    assert Caption(1, "circle", position="left").open == ("colour", "size", "background")
    assert Caption(1, "circle", position="left").stated == ("shape", "position")
    assert Caption(3).layout_open and not Caption(1, position="top").layout_open


# The held-out split


def test_held_out_combinations_are_balanced():
    assert len(HELD_OUT) == 8
    assert sorted(colour for _, colour, _ in HELD_OUT) == sorted(COLOUR_NAMES)  # every colour once
    assert set(Counter(shape for shape, _, _ in HELD_OUT).values()) <= {2, 3}
    assert set(Counter(count for _, _, count in HELD_OUT).values()) <= {2, 3}
    assert {shape for shape, _, _ in HELD_OUT} == set(SHAPES) and {count for *_, count in HELD_OUT} == set(COUNTS)


def test_held_out_prompts_are_64_distinct_held_out_captions_that_mostly_leave_the_layout_open():
    prompts = held_out_prompts()
    assert len(prompts) == 64 and len(set(prompts)) == 64
    captions = [parse(prompt) for prompt in prompts]
    assert [caption.text() for caption in captions] == prompts
    assert all(caption.is_held_out() for caption in captions)
    assert Counter((caption.shape, caption.colour, caption.count) for caption in captions) == {
        triple: 8 for triple in HELD_OUT}
    assert sum(caption.position is None for caption in captions) >= 48
    # Size, background or position open in most; a position is never stated for two or three objects.
    assert sum(bool(caption.open) for caption in captions) >= 48
    # Both sizes, unsaid sizes, named and unsaid backgrounds, and named positions occur.
    assert {caption.size for caption in captions} == {None, *SIZE_NAMES}
    assert None in {caption.background for caption in captions}
    assert {caption.background for caption in captions} - {None} == set(COLOUR_NAMES)
    assert len({caption.position for caption in captions} - {None}) >= 3


def test_training_captions_and_pictures_never_hold_a_held_out_combination():
    pairs = training(3000, seed=1)
    assert not any(caption.is_held_out() for caption, _ in pairs)
    assert not any(scene.shows_held_out() for _, scene in pairs)
    assert not set(held_out_prompts()) & {caption.text() for caption, _ in pairs}


def test_a_scene_that_shows_a_held_out_combination_is_drawn_again():
    rng = random.Random(2)
    assert not any(draw_scene(Caption(1), rng).shows_held_out() for _ in range(1000))
    assert any(draw_scene(Caption(1), rng, allow_held_out=True).shows_held_out() for _ in range(1000))
    held_out = Caption(1, "circle", "red")
    assert (held_out.shape, held_out.colour, held_out.count) in HELD_OUT
    assert draw_scene(held_out, rng, allow_held_out=True).shows_held_out()
    # Every scene of a held-out caption shows it: refused rather than drawn again forever.
    with pytest.raises(ValueError, match="'a red circle' is a held-out combination"):
        draw_scene(held_out, rng)


def test_training_pictures_show_every_part_of_each_held_out_combination():
    """Evaluation asks for new combinations, not for values or pairs training never showed."""
    seen = set()
    for _, scene in training(3000, seed=3):
        count = len(scene.objects)
        for item in scene.objects:
            seen |= {("shape", item.shape), ("colour", item.colour), ("count", count),
                     ("shape-colour", item.shape, item.colour), ("shape-count", item.shape, count),
                     ("colour-count", item.colour, count)}
    for shape, colour, count in HELD_OUT:
        for part in (("shape", shape), ("colour", colour), ("count", count), ("shape-colour", shape, colour),
                     ("shape-count", shape, count), ("colour-count", colour, count)):
            assert part in seen, part


# The scenes


def test_scenes_keep_apart_inside_the_margin_with_their_sizes_and_places():
    pairs = training(3000, seed=4)
    for caption, scene in pairs:
        assert len(scene.objects) == caption.count
        assert scene.background not in {item.colour for item in scene.objects}
        for name in ("shape", "colour", "size"):
            if getattr(caption, name) is not None:
                assert {getattr(item, name) for item in scene.objects} == {getattr(caption, name)}
        if caption.background is not None:
            assert scene.background == caption.background
        for item in scene.objects:
            low, high = SIDES[item.size]
            assert low <= item.side <= high
            assert all(MARGIN - 1e-9 <= edge <= 1 - MARGIN + 1e-9 for edge in item.box), item
            if caption.position is not None:
                assert item.position == nearest_anchor(item.centre) == caption.position
        for a, b in combinations(scene.objects, 2):
            assert scenes._apart(a.box, b.box), (a, b)
            gaps = (b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
            assert max(gaps) >= GAP - 1e-9


def test_open_attributes_are_drawn_from_their_whole_range():
    pairs = training(3000, seed=5)
    objects = [(caption, item) for caption, scene in pairs for item in scene.objects]
    for name, values in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("size", SIZE_NAMES)):
        assert {getattr(item, name) for caption, item in objects if getattr(caption, name) is None} == set(values)
    assert {item.position for caption, item in objects if caption.position is None} == set(POSITIONS)
    assert {scene.background for caption, scene in pairs if caption.background is None} == set(COLOUR_NAMES)
    assert {len(scene.objects) for _, scene in pairs} == set(COUNTS)


def test_stated_positions_keep_the_object_near_its_anchor():
    rng = random.Random(6)
    for position, size, _ in product(POSITIONS, SIZE_NAMES, range(40)):
        [item] = draw_scene(Caption(1, size=size, position=position), rng).objects
        anchor = ANCHORS[position]
        assert max(abs(item.centre[0] - anchor[0]), abs(item.centre[1] - anchor[1])) <= scenes.JITTER + 1e-9
        assert nearest_anchor(item.centre) == position


def test_scenes_are_drawn_the_same_way_for_the_same_seed():
    caption = Caption(3, background="white")
    assert draw_scene(caption, random.Random(8)) == draw_scene(caption, random.Random(8))
    assert draw_scene(caption, random.Random(8)) != draw_scene(caption, random.Random(9))
    text = "two large shapes"
    assert (draw_scene(parse(text), caption_rng(text, 0)) == draw_scene(parse(text), caption_rng(text, 0))
            != draw_scene(parse(text), caption_rng(text, 1)))
    assert caption_rng(text, 0).random() != caption_rng("two small shapes", 0).random()


def test_render_is_deterministic_and_sized():
    scene = draw_scene(Caption(2, colour="green", background="black"), random.Random(10))
    image = render_scene(scene, resolution=96)
    assert image.mode == "RGB" and image.size == (96, 96)
    assert image.tobytes() == render_scene(scene, resolution=96).tobytes()
    assert image.getpixel((0, 0)) == shapes.COLOURS["black"]  # the border is background
    with pytest.raises(HarnessError, match="multiple of 8"):
        render_scene(scene, resolution=60)


def test_a_render_draws_the_object_where_the_scene_says():
    item = ShapeObject("square", "red", "large", (0.5, 0.5), 0.375)
    image = render_scene(scenes.Scene("blue", (item,)), resolution=64)
    assert image.getpixel((32, 32)) == shapes.COLOURS["red"]
    # The box spans 0.3125..0.6875 of the side: pixels 20 to 43 of 64.
    assert image.getpixel((32, 20)) == image.getpixel((32, 43)) == shapes.COLOURS["red"]
    assert image.getpixel((32, 19)) == image.getpixel((32, 44)) == shapes.COLOURS["blue"]


# The data set


def test_open_data_set_pairs_each_picture_with_its_caption(tmp_path):
    out = write_dataset(tmp_path / "set", n=40, seed=3, resolution=64)
    replay = training(40, seed=3)
    for index, (caption, scene) in enumerate(replay):
        text = (out / "captions" / f"{index:06d}.txt").read_text(encoding="utf-8")
        assert text == caption.text() + "\n" and parse(text) == caption
        with Image.open(out / "images" / f"{index:06d}.png") as image:
            picture = image.convert("RGB")
        assert picture.tobytes() == render_scene(scene, 64).tobytes()
        assert judge(picture, text)["overall"] == 1.0


def test_open_data_set_leaves_most_layouts_open_and_shows_every_count():
    captions = [caption for caption, _ in training(2000, seed=0)]
    assert sum(caption.layout_open for caption in captions) > 0.6 * len(captions)
    assert Counter(caption.count for caption in captions).keys() == set(COUNTS)
    assert min(Counter(caption.count for caption in captions).values()) > 0.15 * len(captions)
    # Every attribute is stated in some captions and left open in others.
    for name in scenes.OPEN_ATTRIBUTES:
        stated = sum(getattr(caption, name) is not None for caption in captions)
        assert 0.1 * len(captions) < stated < 0.9 * len(captions), name


@pytest.mark.parametrize("grammar", ["open", "closed"])
def test_data_set_is_deterministic_per_seed(tmp_path, grammar):
    first = files(write_dataset(tmp_path / "a", n=20, seed=7, grammar=grammar))
    assert first == files(write_dataset(tmp_path / "b", n=20, seed=7, grammar=grammar))
    assert first != files(write_dataset(tmp_path / "c", n=20, seed=8, grammar=grammar))
    longer = files(write_dataset(tmp_path / "d", n=25, seed=7, grammar=grammar))
    assert all(longer[name] == content for name, content in first.items())


def test_the_default_grammar_is_open_and_the_closed_one_is_the_old_data(tmp_path):
    default = write_dataset(tmp_path / "default", n=30, seed=1, resolution=32)
    assert files(default) == files(write_dataset(tmp_path / "open", n=30, seed=1, resolution=32, grammar="open"))
    closed = write_dataset(tmp_path / "closed", n=30, seed=1, resolution=32, grammar="closed")
    open_texts = [path.read_text(encoding="utf-8") for path in sorted((default / "captions").iterdir())]
    closed_texts = [path.read_text(encoding="utf-8") for path in sorted((closed / "captions").iterdir())]
    assert all(parse(text) for text in open_texts)
    assert not all(_is_closed(text) for text in open_texts)
    for index, text in enumerate(closed_texts):
        attrs = shapes.parse_caption(text)
        assert not shapes.is_held_out(attrs)
        with Image.open(closed / "images" / f"{index:06d}.png") as image:
            assert image.convert("RGB").tobytes() == shapes.render(attrs, 32).tobytes()


def _is_closed(text):
    try:
        shapes.parse_caption(text)
    except ValueError:
        return False
    return True


def test_an_unknown_grammar_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(HarnessError, match="--grammar 'free' is not one of open, closed"):
        write_dataset(tmp_path / "set", n=2, seed=0, grammar="free")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_open_data_set_leaves_nothing_behind(tmp_path, monkeypatch):
    rendered = []

    def render_then_interrupt(scene, resolution):
        rendered.append(scene)
        if len(rendered) > 3:
            raise KeyboardInterrupt
        return render_scene(scene, resolution)

    monkeypatch.setattr(scenes, "render_scene", render_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "set", n=50, seed=0, resolution=32)
    assert len(rendered) == 4
    assert list(tmp_path.iterdir()) == []


# The command


@pytest.mark.parametrize("grammar_args, readable", [
    ([], lambda text: parse(text)),
    (["--grammar", "open"], lambda text: parse(text)),
    (["--grammar", "closed"], lambda text: shapes.parse_caption(text)),
])
def test_cli_writes_the_data_set_of_either_grammar(tmp_path, grammar_args, readable):
    out = tmp_path / "shapes"
    result = invoke("data", "shapes", "--out", out, "--n", 20, "--seed", 2, *grammar_args)
    assert result.exit_code == 0, result.output
    grammar = grammar_args[1] if grammar_args else "open"
    assert f"wrote 20 images and captions (64x64, seed 2, {grammar} grammar)" in result.output
    assert len(list((out / "images").glob("*.png"))) == 20
    texts = [path.read_text(encoding="utf-8") for path in sorted((out / "captions").glob("*.txt"))]
    assert len(texts) == 20 and all(readable(text) for text in texts)
    assert files(out) == files(write_dataset(tmp_path / "api", n=20, seed=2, grammar=grammar))


def test_cli_refuses_an_unknown_grammar(tmp_path):
    result = invoke("data", "shapes", "--out", tmp_path / "set", "--n", 2, "--grammar", "free")
    assert result.exit_code == 2
    assert "'free' is not one of 'open', 'closed'" in result.output
    assert not (tmp_path / "set").exists()
