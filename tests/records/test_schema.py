"""The record schema as types: the docs' table, the JSON round trip, and the checks of every field."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.errors import RecordError
from harness.records.schema import (
    SCHEMA,
    Comparison,
    Measured,
    Memory,
    RankFigures,
    Record,
    Stages,
    Stats,
    Timing,
    UnetCounts,
)
from harness.records.store import append_record, read_records
from tests.conftest import make_record

RECORDS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "records.md"


def names(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def documented_record_rows() -> dict[str, str]:
    """The Records table of docs/reference/records.md: each backticked field name of the first column -> its meaning."""
    section = RECORDS_PAGE.read_text(encoding="utf-8").split("## Records", 1)[1]
    table = section[section.index("| Field | Meaning |"):].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        field_cell, meaning = line.strip("|").split("|", 1)
        for name in re.findall(r"`([^`]+)`", field_cell):
            rows[name] = meaning
    return rows


def test_the_documented_table_names_exactly_the_json_fields():
    rows = documented_record_rows()
    top_level = {name.split(".")[0] for name in rows}
    json_keys = (names(Record) - {"measured"}) | names(Measured) | {"status", "error"}
    assert top_level == json_keys - {"error"}  # `error` is explained in the `status` row
    assert "`error`" in rows["status"]
    timing_rows = {name.split(".", 1)[1] for name in rows if name.startswith("timing.")}
    assert timing_rows == names(Timing)


@pytest.mark.parametrize("field, cls", [("unet", UnetCounts), ("stages", Stages), ("memory", Memory),
                                        ("comparisons", Comparison), ("ranks", RankFigures),
                                        ("timing.seconds_per_call", Stats)])
def test_the_docs_list_the_fields_of_each_nested_part(field, cls):
    quoted = " ".join(re.findall(r"`([^`]+)`", documented_record_rows()[field]))
    listed = set(re.findall(r"[a-z_0-9]+", quoted))
    assert names(cls) <= listed


def test_a_record_survives_the_round_trip_through_json(tmp_path):
    record = make_record("flash-lcm", 4, 0.2, metrics={"psnr": {"value": 28.5, "higher_is_better": True}},
                         comparisons=[("vanilla-sd", 30, "compare_baseline30_flash4_seed42.png")])
    failed = make_record("flash-lcm", 8, error="CUDA out of memory")
    path = tmp_path / "records.jsonl"
    for item in (record, failed):
        append_record(path, item)
    assert read_records(path) == [record, failed]
    flat = json.loads(path.read_text().splitlines()[0])
    assert flat["schema"] == SCHEMA and flat["status"] == "ok" and flat["timing"]["seconds_per_image"] == 0.2
    assert flat["memory"] == {"peak_rss_mb": 400.0}  # only the figures the device has
    failed_json = json.loads(path.read_text().splitlines()[1])
    assert failed_json["status"] == "failed" and "timing" not in failed_json


def good_json() -> dict:
    return make_record("flash-lcm", 4, 0.2).to_json()


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(schema="harness.record/0"), "schema 'harness.record/0' is not 'harness.record/1'"),
    (lambda r: r.update(status="done"), "status 'done' is neither 'ok' nor 'failed'"),
    (lambda r: r.update(steps="4"), "'steps' should be a whole number, not '4'"),
    (lambda r: r.update(baseline=1), "'baseline' should be true or false, not 1"),
    (lambda r: r["timing"].update(seconds_per_image="fast"), "'timing.seconds_per_image' should be a finite number"),
    (lambda r: r["timing"]["seconds_per_call"].update(median=0), "'timing.seconds_per_call.median' is 0"),
    (lambda r: r["timing"].update(seconds_per_image=float("nan")), "should be a finite number, not nan"),
    (lambda r: r.update(images="a.png"), "'images' should be a list, not 'a.png'"),
    (lambda r: r["images"].append(3), "'images[1]' should be text, not 3"),
    (lambda r: r.pop("timing"), "'timing' is missing"),
    (lambda r: r.update(status="failed"), "a failed record without its 'error' text"),
])
def test_each_wrong_field_is_named(change, message):
    data = good_json()
    change(data)
    with pytest.raises(RecordError, match=re.escape(message)):
        Record.from_json(data)


def test_a_bad_line_is_named_by_number_and_skipped(tmp_path):
    path = tmp_path / "records.jsonl"
    append_record(path, make_record("flash-lcm", 2, 0.1))
    with open(path, "ab") as handle:
        handle.write(b'{"schema": "harness.record/1", "status": "ok"}\n\xff\xfe\n[1, 2]\n{"torn": ')
    append_record(path, make_record("flash-lcm", 4, 0.2))  # appended after the torn line, as a crash would leave it
    skipped = []
    found = read_records(path, on_skip=skipped.append)
    assert [record.steps for record in found] == [2, 4]  # the torn line gets its line end: the next record stays whole
    assert skipped == [
        f"line 2 of {path}: 'sampler' is missing; skipped",
        f"line 3 of {path}: not UTF-8 text; skipped",
        f"line 4 of {path}: a list, not a JSON object; skipped",
        f"line 5 of {path}: not JSON (a line cut short by a crash, or not written by harness); skipped",
    ]
    with pytest.raises(RecordError, match=f"line 2 of {re.escape(str(path))}: 'sampler' is missing"):
        read_records(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=60) | json_values.map(lambda v: json.dumps(v).encode()), max_size=6))
def test_no_file_content_makes_the_reader_raise_anything_but_a_named_skip(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "records.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    skipped = []
    assert read_records(path, on_skip=skipped.append) == []
    assert all(re.match(rf"line \d+ of {re.escape(str(path))}: .+; skipped$", line) for line in skipped)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_damaged_field_of_a_real_record_is_refused_by_name(data):
    record = good_json()
    key = data.draw(st.sampled_from(sorted(record)))
    record[key] = data.draw(json_values)
    try:
        parsed = Record.from_json(record)
    except RecordError as error:
        assert str(error)
    else:
        assert parsed.to_json()["sampler"] == record.get("sampler")
