"""Training data: the seed's folder layouts, imagefolder, Hugging Face datasets, clear errors, data order."""

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from harness.errors import HarnessError
from harness.training.data import ImageCaptionDataset, StreamBatchSampler, centre_crop, find_examples

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def shapes_examples(count: int):
    """(name, image, caption): coloured circles and squares on other colours; images not square on purpose."""
    names = list(COLOURS)
    for index in range(count):
        foreground, background = names[index % 4], names[(index + 1 + index // 4) % 4]
        shape = ("circle", "square")[index % 2]
        image = Image.new("RGB", (80, 72), COLOURS[background])
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((22, 18, 58, 54), fill=COLOURS[foreground])
        yield f"{index:03d}", image, f"a {foreground} {shape} on a {background} background"


def write_shapes(folder: Path, count: int = 8, layout: str = "beside") -> Path:
    """A data folder in one of the layouts --data_dir reads: beside, images+captions, metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    image_folder = folder / "images" if layout == "images+captions" else folder
    caption_folder = folder / "captions" if layout == "images+captions" else folder
    image_folder.mkdir(exist_ok=True)
    caption_folder.mkdir(exist_ok=True)
    rows = []
    for name, image, caption in shapes_examples(count):
        image.save(image_folder / f"{name}.png")
        if layout == "metadata":
            rows.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
        else:
            (caption_folder / f"{name}.txt").write_text(caption + "\n")
    if layout == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("layout", ["beside", "images+captions", "metadata"])
def test_every_folder_layout_pairs_each_image_with_its_caption(tmp_path, layout):
    folder = write_shapes(tmp_path / "data", count=5, layout=layout)
    examples = find_examples(None, str(folder))
    expected = list(shapes_examples(5))
    assert examples.captions == [caption for _, _, caption in expected]
    for index, (_, image, _) in enumerate(expected):
        assert list(examples.read_image(index).convert("RGB").getdata()) == list(image.getdata())


def test_max_train_samples_takes_the_first_examples(tmp_path):
    folder = write_shapes(tmp_path / "data", count=6)
    examples = find_examples(None, str(folder), max_train_samples=2)
    assert examples.captions == [caption for _, _, caption in shapes_examples(2)]


def test_images_without_captions_captions_without_images_and_broken_images_are_counted(tmp_path):
    folder = write_shapes(tmp_path / "data", count=5, layout="images+captions")
    (folder / "captions" / "001.txt").unlink()
    (folder / "images" / "002.png").unlink()
    (folder / "images" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    examples = find_examples(None, str(folder))
    assert len(examples) == 2  # 000 and 004
    assert examples.skipped == [
        f"1 image(s) without a caption file, e.g. '{folder / 'images' / '001.png'}'",
        f"1 caption(s) without an image, e.g. '{folder / 'captions' / '002.txt'}'",
        f"1 unreadable image(s), e.g. '{folder / 'images' / '003.png'}'",
    ]


def test_nothing_usable_left_is_an_error_that_says_why(tmp_path):
    folder = write_shapes(tmp_path / "data", count=2)
    for caption in folder.glob("*.txt"):
        caption.unlink()
    with pytest.raises(HarnessError, match=r"holds no usable image with a caption \(2 image\(s\) without a caption"):
        find_examples(None, str(folder))


def test_a_folder_without_images_explains_the_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(HarnessError, match="images/\\*.png \\+ captions/\\*.txt"):
        find_examples(None, str(tmp_path))
    with pytest.raises(HarnessError, match="is not a folder"):
        find_examples(None, str(tmp_path / "absent"))


def test_bad_metadata_line_is_skipped_and_reported_with_its_number(tmp_path):
    folder = write_shapes(tmp_path / "data", count=2, layout="metadata")
    with open(folder / "metadata.jsonl", "a") as handle:
        handle.write('{"file_name": "000.png"}\n')
    examples = find_examples(None, str(folder))
    assert len(examples) == 2
    assert examples.skipped == [f"1 unusable line(s) of metadata.jsonl, e.g. line 3 of {folder / 'metadata.jsonl'}: "
                                "no caption field (text, caption, captions, prompt, sentence, description, title)"]


def test_images_are_resized_and_centre_cropped():
    # A wide image: red left quarter, blue middle half, green right quarter. The crop keeps the middle.
    image = Image.new("RGB", (160, 80), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 80))
    image.paste((0, 255, 0), (120, 0, 160, 80))
    cropped = centre_crop(image, 40)
    assert cropped.size == (40, 40)
    assert cropped.getpixel((20, 20)) == (0, 0, 255)
    assert cropped.getpixel((1, 20))[2] > 200 and cropped.getpixel((38, 20))[2] > 200


def test_dataset_items_are_pixels_in_minus_one_to_one(tmp_path):
    folder = write_shapes(tmp_path / "data", count=2)
    item = ImageCaptionDataset(find_examples(None, str(folder)), 64)[0]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["caption"] == next(shapes_examples(1))[2]


def _parquet_dataset(folder: Path, image_column: str, caption_column: str) -> Path:
    import datasets

    examples = list(shapes_examples(3))
    table = datasets.Dataset.from_dict({image_column: [image for _, image, _ in examples],
                                        caption_column: [caption for _, _, caption in examples],
                                        "width": [80, 80, 80]})
    folder.mkdir()
    table.to_parquet(str(folder / "train.parquet"))
    return folder


def test_hugging_face_dataset_columns_are_detected(tmp_path):
    folder = _parquet_dataset(tmp_path / "hf", "picture", "caption")
    examples = find_examples(str(folder), None)
    assert examples.captions == [caption for _, _, caption in shapes_examples(3)]
    assert examples.read_image(0).size == (80, 72)


def test_hugging_face_columns_can_be_named_and_wrong_names_list_the_columns(tmp_path):
    folder = _parquet_dataset(tmp_path / "hf", "photo", "words")
    with pytest.raises(HarnessError, match="pass --caption_column"):
        find_examples(str(folder), None)
    examples = find_examples(str(folder), None, image_column="photo", caption_column="words")
    assert len(examples) == 3
    with pytest.raises(HarnessError, match="columns: photo, words, width"):
        find_examples(str(folder), None, caption_column="text")


def test_an_unreachable_dataset_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HarnessError) as error:
        find_examples("someone/no-such-dataset", None)
    assert "cannot load dataset 'someone/no-such-dataset'" in str(error.value)
    assert "\n" not in str(error.value)


def test_the_seeds_removed_pokemon_dataset_suggests_naruto():
    with pytest.raises(HarnessError, match="lambdalabs/naruto-blip-captions"):
        find_examples("lambdalabs/pokemon-blip-captions", None)


def test_stream_batches_split_across_processes_without_overlap():
    single = iter(StreamBatchSampler(10, batch_size=4, seed=3))
    ranks = [iter(StreamBatchSampler(10, batch_size=2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):
        assert next(single) == next(ranks[0]) + next(ranks[1])


def test_stream_batches_resume_where_they_stopped_and_visit_every_example_each_epoch():
    uninterrupted = iter(StreamBatchSampler(6, batch_size=4, seed=1))
    batches = [next(uninterrupted) for _ in range(6)]  # 24 samples: four epochs of six
    resumed = iter(StreamBatchSampler(6, batch_size=4, seed=1, start=12))
    assert [next(resumed) for _ in range(3)] == batches[3:]
    stream = [index for batch in batches for index in batch]
    for epoch in range(4):
        assert sorted(stream[epoch * 6:(epoch + 1) * 6]) == list(range(6))
    assert stream[:6] != stream[6:12]  # a new order each epoch
