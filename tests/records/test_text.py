"""Escaping text from outside for where it lands: markdown cells, the terminal, names that become files.

Fuzzed with hypothesis: whatever the text, a markdown cell stays one cell of one row, and terminal text holds no
character that drives a terminal or moves text about.
"""

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.records.text import markdown_cell, markdown_code, name_problem, terminal_text
from harness.reporting.markdown import markdown_table

# Characters that must never reach a terminal or a markdown line as they are.
DANGEROUS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
HOSTILE = st.text(alphabet=st.sampled_from(list("|\\`\n\r\t\x1b\x07\x08\x00\x7f\x85\u2028\u202e\u200b[]ab ")) |
                  st.characters(), max_size=40)


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_terminal_text_holds_nothing_that_drives_a_terminal(text):
    shown = terminal_text(text)
    assert not DANGEROUS.search(shown)
    assert all(unicodedata.category(char) not in ("Cc", "Zl", "Zp") for char in shown)
    assert "\n" not in shown and "\r" not in shown


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs")), max_size=40))
def test_terminal_text_leaves_ordinary_text_as_it_is(text):
    assert terminal_text(text) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(HOSTILE, max_size=5))
def test_terminal_text_keeps_only_the_line_ends_asked_for(lines):
    block = "\n".join(lines)
    shown = terminal_text(block, keep_newlines=True)
    assert shown.count("\n") == block.count("\n")
    assert not DANGEROUS.search(shown.replace("\n", ""))


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_a_markdown_cell_is_one_line_with_every_pipe_escaped(text):
    cell = markdown_cell(text)
    assert "\n" not in cell and "\r" not in cell and not DANGEROUS.search(cell)
    assert not UNESCAPED_PIPE.search(cell)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(HOSTILE, min_size=3, max_size=3), min_size=1, max_size=4), st.lists(HOSTILE, min_size=3,
                                                                                            max_size=3))
def test_a_markdown_table_keeps_its_rows_and_columns_whatever_its_cells_hold(rows, headers):
    table = markdown_table(rows, headers, disable_numparse=True)
    lines = table.split("\n")
    assert len(lines) == len(rows) + 2  # header, rule, one line per row
    for line in lines:
        assert len(UNESCAPED_PIPE.findall(line)) == 4, line  # three cells: four separators
        assert not DANGEROUS.search(line)


@settings(max_examples=200, deadline=None)
@given(HOSTILE)
def test_a_code_span_cannot_be_closed_by_its_text(text):
    span = markdown_code(text)
    fence = re.match("`+", span).group()
    inner = span[len(fence):-len(fence)]
    assert span.endswith(fence) and "\n" not in span
    assert max((len(run) for run in re.findall("`+", inner)), default=0) < len(fence)  # no run closes it early


def test_escapes_are_readable():
    assert terminal_text("a\x1b]0;pwned\x07b\nc\u202ed") == "a\\x1b]0;pwned\\x07b\\nc\\u202ed"
    assert markdown_cell("a | b\nc") == "a \\| b\\nc"
    assert markdown_code("x`y") == "``x`y``" and markdown_code("`x") == "`` `x ``"


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "..", ".", ".hidden", "-x", "a b", "a\x1bb", "",
                                  "x" * 101, "a\u202eb", "a\nb", None, 3, "a..b"])
def test_names_that_cannot_be_file_names_or_command_words_are_refused(name):
    problem = name_problem(name, "sampler")
    assert problem is not None and problem.startswith("sampler name") and "\n" not in problem


@pytest.mark.parametrize("name", ["flash-lcm", "my_sampler.v2", "dpm++2m", "ünïcode", "x" * 100, "a.b"])
def test_ordinary_names_are_accepted(name):
    assert name_problem(name, "sampler") is None
