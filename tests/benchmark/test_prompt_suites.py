"""Prompt suites (`--prompts coco2017-5k`, ...) and caption files (JSONL, CSV, Parquet) on small local copies:
the seeded draw, one caption per image, what the run records, and the one-line refusals. Nothing reaches a hub:
`datasets.load_dataset` is replaced by a local data set, or fails as it does offline."""

import csv
import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.benchmark.suites import DRAW, SUITES, VAL2014, load_prompt_set
from harness.errors import HarnessError
from tests.conftest import invoke, record_json

IMAGES = {100 + i: [f"image {100 + i} caption {j}" for j in range(5)] for i in range(12)}  # COCO: ~5 per image
LONG_ROWS = [{"image_id": image, "caption": caption} for image, captions in IMAGES.items() for caption in captions]


def plan(*args):
    result = invoke("bench", "--dry-run", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["spec"]


def image_of(prompt):
    return int(prompt.split()[1])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


@pytest.fixture(params=sorted(WRITERS))
def caption_file(request, tmp_path):
    """COCO's captions file in long form (one row per caption, image_id repeated), in each format."""
    return WRITERS[request.param](tmp_path / f"captions.{request.param}", LONG_ROWS)


# ----- the draw -----

def test_a_caption_file_draws_one_caption_per_image_fixed_by_the_seed(caption_file):
    drawn = load_prompt_set(str(caption_file), seed=7, count=6)
    assert len(drawn.prompts) == 6
    images = [image_of(prompt) for prompt in drawn.prompts]
    assert len(set(images)) == 6  # one caption per image, never two of one image
    assert all(prompt in IMAGES[image] for prompt, image in zip(drawn.prompts, images))
    assert load_prompt_set(str(caption_file), seed=7, count=6).prompts == drawn.prompts  # same seed, same subset
    other = load_prompt_set(str(caption_file), seed=8, count=6).prompts
    assert other != drawn.prompts and {image_of(p) for p in other} != set(images)
    assert drawn.suite == {"name": None, "file": str(caption_file), "column": "caption", "image_key": "image_id",
                           "images": 12, "count": 6, "seed": 7, "draw": DRAW}


def test_the_draw_is_the_same_in_every_format_and_row_order_and_a_smaller_draw_is_its_start(tmp_path):
    drawn = [load_prompt_set(str(write(tmp_path / f"c.{kind}", LONG_ROWS)), seed=3, count=8).prompts
             for kind, write in WRITERS.items()]
    assert drawn[0] == drawn[1] == drawn[2]
    shuffled = random.Random(0).sample(LONG_ROWS, len(LONG_ROWS))
    assert load_prompt_set(str(write_jsonl(tmp_path / "s.jsonl", shuffled)), seed=3, count=8).prompts == drawn[0]
    assert load_prompt_set(str(tmp_path / "c.csv"), seed=3, count=4).prompts == drawn[0][:4]


def test_a_caption_file_without_a_count_is_taken_whole_in_order(tmp_path):
    rows = [{"text": f"prompt {i}", "note": "x"} for i in range(5)]
    drawn = load_prompt_set(str(write_csv(tmp_path / "p.csv", rows)))
    assert drawn.prompts == [f"prompt {i}" for i in range(5)]
    assert drawn.suite is not None and drawn.suite["column"] == "text" and drawn.suite["image_key"] is None


def test_lists_of_captions_and_karpathy_sentence_structs_give_one_caption_each(tmp_path):
    lists = [{"cocoid": image, "captions": captions} for image, captions in IMAGES.items()]
    structs = [{"cocoid": image, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
               for image, captions in IMAGES.items()]
    first = load_prompt_set(str(write_parquet(tmp_path / "l.parquet", lists)), seed=1, count=12).prompts
    second = load_prompt_set(str(write_jsonl(tmp_path / "s.jsonl", structs)), seed=1, count=12).prompts
    assert first == second and sorted(map(image_of, first)) == sorted(IMAGES)
    assert len({prompt.split("caption")[1] for prompt in first}) > 1  # not always the first caption


def test_prompt_count_draws_from_a_plain_prompt_file_and_records_it(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(20)), encoding="utf-8")
    spec = plan("--prompts", path, "--prompt_count", "5", "--prompt_seed", "2")
    assert len(set(spec["prompts"])) == 5 and spec["prompt_suite"]["count"] == 5
    assert plan("--prompts", path)["prompt_suite"] is None  # a prompt file taken whole records nothing new


def test_a_jsonl_prompt_file_with_a_prompt_field_reads_as_before(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a cat", "caption": "a kitten"},
                                               {"prompt": "a dog", "caption": "a puppy"}])
    spec = plan("--prompts", path)
    assert spec["prompts"] == ["a cat", "a dog"] and spec["prompt_suite"] is None
    named = plan("--prompts", path, "--prompt_column", "caption")  # a named column is read instead
    assert named["prompts"] == ["a kitten", "a puppy"] and named["prompt_suite"]["column"] == "caption"


# ----- hub suites, from a local stand-in -----

def fake_hub(monkeypatch, tables):
    """datasets.load_dataset answering from local data sets, by (id, split); the calls are kept."""
    calls = []

    def load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return tables[name, split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def coco2017(images=5000):
    return datasets.Dataset.from_dict({
        "image_id": list(range(images)),
        "file_name": [f"{i:012d}.jpg" for i in range(images)],
        "captions": [[f"image {i} caption {j}" for j in range(5)] for i in range(images)],
    })


def test_coco2017_5k_draws_5000_images_one_caption_each_and_records_its_source(monkeypatch, tmp_path):
    calls = fake_hub(monkeypatch, {("phiyodr/coco2017", "validation"): coco2017()})
    spec = plan("--prompts", "coco2017-5k", "--prompt_seed", "11")
    assert calls == [("phiyodr/coco2017", "validation")]
    prompts = spec["prompts"]
    assert len(prompts) == 5000 and len({image_of(p) for p in prompts}) == 5000
    assert spec["prompt_suite"] == {"name": "coco2017-5k", "dataset": "phiyodr/coco2017", "split": "validation",
                                    "column": "captions", "image_key": "image_id", "images": 5000, "count": 5000,
                                    "seed": 11, "draw": DRAW}
    again = plan("--prompts", "coco2017-5k", "--prompt_seed", "11")["prompts"]
    other = plan("--prompts", "coco2017-5k", "--prompt_seed", "12")["prompts"]
    assert again == prompts and other != prompts  # all 5,000 images either way: other captions, other order


def test_coco_2014_suites_draw_from_all_of_val2014_and_nest(monkeypatch):
    karpathy = datasets.Dataset.from_dict({
        "cocoid": list(range(31000)), "filepath": ["val2014"] * 31000,
        "sentences": [[f"image {i} caption {j}" for j in range(5)] for i in range(31000)],
    })
    calls = fake_hub(monkeypatch, {("yerevann/coco-karpathy", VAL2014): karpathy})
    five = load_prompt_set("coco2014-5k", seed=0)
    thirty = load_prompt_set("coco-30k", seed=0)
    assert calls == [("yerevann/coco-karpathy", "restval+validation+test")] * 2
    assert len(five.prompts) == 5000 and len(thirty.prompts) == 30000
    assert len({image_of(p) for p in thirty.prompts}) == 30000
    assert thirty.prompts[:5000] == five.prompts  # the 30k draw starts with the 5k draw of the same seed
    assert thirty.suite is not None and thirty.suite["images"] == 31000 and thirty.suite["image_key"] == "cocoid"


@pytest.mark.parametrize("name, column", [("parti", "Prompt"), ("drawbench", "Prompts")])
def test_parti_and_drawbench_are_taken_whole_in_their_order(monkeypatch, name, column):
    rows = datasets.Dataset.from_dict({column: [f"{name} prompt {i}" for i in range(9)], "Category": ["c"] * 9})
    fake_hub(monkeypatch, {(SUITES[name].dataset, "train"): rows})
    drawn = load_prompt_set(name)
    assert drawn.prompts == [f"{name} prompt {i}" for i in range(9)]
    assert drawn.suite is not None and drawn.suite["column"] == column and drawn.suite["count"] == 9
    assert len(load_prompt_set(name, count=4, seed=5).prompts) == 4


def test_a_save_to_disk_copy_serves_a_suite_offline(tmp_path):
    karpathy = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"cocoid": [f"{split}{i}" for i in range(4)],
                                           "sentences": [[f"{split} {i} a", f"{split} {i} b"] for i in range(4)]})
        for split in ("train", "restval", "validation", "test")})
    karpathy.save_to_disk(str(tmp_path / "karpathy"))
    spec = plan("--prompts", "coco2014-5k", "--prompt_source", tmp_path / "karpathy", "--prompt_count", "12")
    assert len(spec["prompts"]) == 12
    assert not any(prompt.startswith("train") for prompt in spec["prompts"])  # val2014 only: restval+validation+test
    assert spec["prompt_suite"]["file"] == str(tmp_path / "karpathy")
    assert spec["prompt_suite"]["dataset"] == "yerevann/coco-karpathy" and spec["prompt_suite"]["images"] == 12


# ----- refusals: one line, exit 2, no run folder -----

def one_line(result):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_offline_without_a_cache_is_one_line_and_leaves_no_run_folder(monkeypatch, tmp_path):
    def offline(name, split=None, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    outdir = tmp_path / "run"
    line = one_line(invoke("bench", "--prompts", "coco2017-5k", "--outdir", outdir, "--warmup", "0", "--quiet"))
    assert line.startswith("Error: cannot load coco2017-5k (the Hugging Face dataset phiyodr/coco2017, validation "
                           "split) offline: it is not in the local Hugging Face cache (ConnectionError: Couldn't "
                           "reach 'phiyodr/coco2017' on the Hub (LocalEntryNotFoundError)); download it once with "
                           "network")
    assert "--prompt_source" in line and "--prompts FILE.jsonl with a caption column" in line
    assert not outdir.exists()


def test_the_real_datasets_library_offline_gives_the_same_line():
    # tests/conftest.py sets HF_HUB_OFFLINE=1 and a private, empty HF_HOME: the library's own offline error.
    with pytest.raises(HarnessError, match=r"^cannot load drawbench \(the Hugging Face dataset sayakpaul/drawbench, "
                                           r"train split\) offline: .*download it once with network"):
        load_prompt_set("drawbench")


def test_a_local_copy_smaller_than_the_suite_is_one_line(tmp_path):
    small = write_jsonl(tmp_path / "coco.jsonl", [{"image_id": i, "caption": f"c {i}"} for i in range(100)])
    line = one_line(invoke("bench", "--dry-run", "--prompts", "coco2017-5k", "--prompt_source", small))
    assert line == (f"Error: coco2017-5k draws 5000 images, but file '{small}' holds 100; pass the whole validation "
                    "split with --prompt_source, or draw 100 or fewer with --prompt_count.")
    line = one_line(invoke("bench", "--dry-run", "--prompts", small, "--prompt_count", "500"))
    assert line == (f"Error: --prompt_count 500 asks for more prompts than file '{small}' holds (100); ask for 100 "
                    "or fewer.")


def test_a_bad_or_missing_column_is_one_line(caption_file):
    line = one_line(invoke("bench", "--dry-run", "--prompts", caption_file, "--prompt_column", "Caption"))
    assert line == (f"Error: file '{caption_file}' has no column 'Caption'; its columns: image_id, caption. Pass one "
                    "of them as --prompt_column.")


def test_a_file_without_a_caption_like_column_asks_for_prompt_column(tmp_path):
    path = write_csv(tmp_path / "p.csv", [{"id": 1, "description": "a cat"}])
    line = one_line(invoke("bench", "--dry-run", "--prompts", path))
    assert line == (f"Error: cannot tell which column of file '{path}' holds the captions (columns: id, description); "
                    "pass --prompt_column NAME.")
    assert plan("--prompts", path, "--prompt_column", "description")["prompts"] == ["a cat"]


@pytest.mark.parametrize("rows, problem", [
    ([{"caption": "a cat"}, {"caption": "  "}], "row 3 of {source}: column 'caption' is empty"),
    ([{"caption": "a cat"}, {"caption": ""}], "row 3 of {source}: column 'caption' is empty"),
])
def test_an_empty_caption_names_its_row(tmp_path, rows, problem):
    path = write_csv(tmp_path / "p.csv", rows)
    line = one_line(invoke("bench", "--dry-run", "--prompts", path))
    assert line.startswith("Error: " + problem.format(source=f"file '{path}'"))


def test_a_jsonl_line_that_is_not_an_object_or_has_no_caption_is_named(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"caption": "a cat"}\n\n[1]\n', encoding="utf-8")
    assert one_line(invoke("bench", "--dry-run", "--prompts", path)).startswith(
        f"Error: line 3 of {path}: not a JSON object")
    path.write_text('{"caption": "a cat"}\n\n{"caption": 5}\n', encoding="utf-8")
    assert one_line(invoke("bench", "--dry-run", "--prompts", path)).startswith(
        f"Error: line 3 of file '{path}': column 'caption' holds a number, not text")
    path.write_text('{"caption": "a cat"}\n{"text": "a dog"}\n', encoding="utf-8")
    assert one_line(invoke("bench", "--dry-run", "--prompts", path)).startswith(
        f"Error: line 2 of file '{path}': no 'caption' value")


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text("caption\na cat\n", encoding="utf-8")
    assert one_line(invoke("bench", "--dry-run", "--prompts", path)).startswith(
        f"Error: cannot read Parquet file '{path}': ")


@pytest.mark.parametrize("args, message", [
    (["--prompt_count", "3"], "--prompt_column, --prompt_count and --prompt_source choose the prompts of --prompts"),
    (["--prompts", "seed", "--prompt_source", "x.jsonl"], "--prompt_source is the local copy of a suite"),
    (["--prompts", "seed", "--prompt_column", "text"], "--prompt_column names a column of a JSONL, CSV or Parquet"),
    (["--prompts", "coco2017-5k", "--prompt_source", "no-such-copy"], "--prompt_source 'no-such-copy' does not exist"),
    (["--prompts", "coco-5k"], "--prompts 'coco-5k' is neither a file nor a built-in prompt set or suite"),
])
def test_misused_suite_options_are_one_line(args, message):
    assert one_line(invoke("bench", "--dry-run", *args)).startswith("Error: " + message)


# ----- the record -----

@pytest.mark.slow
def test_a_run_records_its_suite_in_the_config(tmp_path, embedded_model):
    path = write_parquet(tmp_path / "captions.parquet", LONG_ROWS)
    outdir = tmp_path / "run"
    result = invoke("bench", "--steps", "1", "--prompts", path, "--prompt_count", "2", "--prompt_seed", "4",
                    "--outdir", outdir, "--warmup", "0", "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    config = record_json(outdir)[0]["config"]
    assert config["prompt_suite"] == {"name": None, "file": str(path), "column": "caption", "image_key": "image_id",
                                      "images": 12, "count": 2, "seed": 4, "draw": DRAW}
    # The prompts themselves are written once, to prompts.json, and named by their digest.
    drawn = load_prompt_set(str(path), seed=4, count=2).prompts
    assert json.loads((outdir / config["prompts_file"]).read_text(encoding="utf-8")) == list(drawn)
    assert config["prompts_count"] == 2 and "prompts" not in config
