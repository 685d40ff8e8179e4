"""A run's prompts, written once (prompts.json) and named by digest in every record; older records, which carry
the prompts themselves, still compare with new ones."""

import json

import pytest

from harness.errors import HarnessError
from harness.records.store import PROMPTS_FILE, prompts_digest, prompts_key, read_prompts, write_prompts
from harness.reporting.runs import Run, check_comparable
from tests.conftest import make_record


def test_the_prompts_file_is_named_by_a_digest_that_changes_with_any_prompt(tmp_path):
    prompts = ["a red square", "zwei blaue Kreise", "emoji \\u2603"]
    fields = write_prompts(tmp_path, prompts)
    assert fields == {"prompts_file": PROMPTS_FILE, "prompts_sha256": prompts_digest(prompts), "prompts_count": 3}
    assert json.loads((tmp_path / PROMPTS_FILE).read_text(encoding="utf-8")) == prompts
    assert read_prompts(tmp_path, fields) == prompts
    assert prompts_digest(prompts) != prompts_digest(["a red square", "zwei blaue Kreise"])
    assert prompts_digest(prompts) != prompts_digest(list(reversed(prompts)))
    (tmp_path / PROMPTS_FILE).write_text(json.dumps(["edited"]), encoding="utf-8")
    assert read_prompts(tmp_path, fields) is None  # a file that no longer matches its digest is not believed


def test_old_records_with_their_prompts_compare_with_new_ones(tmp_path):
    prompts = ["a red square", "two blue circles"]
    old = make_record(config={"prompts": prompts, "seed": 1, "num_images": 1})
    new = make_record(config={**write_prompts(tmp_path / "", prompts), "seed": 1, "num_images": 1})
    assert prompts_key(old.config) == prompts_key(new.config)
    check_comparable([Run(tmp_path / "old", [old]), Run(tmp_path, [new])])
    other = make_record(config={"prompts": ["a red square", "three circles"], "seed": 1, "num_images": 1})
    with pytest.raises(HarnessError, match="prompt 2: 'two blue circles' against 'three circles'"):
        check_comparable([Run(tmp_path, [new]), Run(tmp_path / "other", [other])])
