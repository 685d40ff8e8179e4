"""``harness compare A B``: two runs' timings side by side, and a CI gate on a slowdown; it parses and
prints, the comparison is ``harness.reporting.compare``'s."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from harness.cli.support import say, warn
from harness.errors import ExitCode, HarnessError
from harness.options import FiniteFloat
from harness.reporting.compare import (
    MATCHED_HEADERS,
    UNMATCHED_HEADERS,
    Comparison,
    compare_runs,
    comparison_json,
    comparison_markdown,
    describe,
    load_run,
    matched_rows,
    setup_warning,
    unmatched_rows,
    worst_slowdown,
)
from harness.reporting.html import Side, Table, write_compare_page


def write_html(out: Path, sides: Sequence[Side], comparison: Comparison, warning: str | None) -> None:
    """The comparison page, written before any --fail-above verdict so a failing CI job still has it."""
    tables = [Table("Compared (median seconds per image)", MATCHED_HEADERS, matched_rows(comparison))]
    if comparison.unmatched:
        tables.append(Table("Not compared", UNMATCHED_HEADERS, unmatched_rows(comparison)))
    for message in write_compare_page(out, sides, tables, [warning] if warning else []):
        warn(message)


COMPARE_HELP = """Compare the timings of run A (before) with run B (after).

A and B are run folders or records.jsonl files. Two measurements are compared when they share sampler,
steps, guidance scale, image size and images per call: together these fix the work done per image. The
prompts are not matched: each call draws one prompt padded to a fixed length, so their text and number
change only how many samples the median has. Model, device and dtype are not matched either (compare
them on purpose if you like); a warning says when they differ.

Prints the median seconds/image of each match in A and B, the ratio B/A and the change, then the
measurements only one run has and the failed ones.

\b
Exit codes:
  0  no matched median slowed by more than --fail-above (or no --fail-above)
  1  a matched median slowed by more than --fail-above PCT percent
  2  bad input: a missing run, no records, or nothing that matches

\b
Example (a CI guard):
  harness compare results/main results/branch --fail-above 10"""


@click.command(name="compare", help=COMPARE_HELP)
@click.argument("run_a", metavar="A", type=click.Path(path_type=Path))
@click.argument("run_b", metavar="B", type=click.Path(path_type=Path))
@click.option("--fail-above", "fail_above_pct", type=FiniteFloat(min=0), metavar="PCT",
              help="Exit with code 1 when any matched median is more than PCT percent slower in B.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of tables.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.html",
              help="Also write one self-contained page: the comparison table, then each run's timing table and "
                   "grids side by side (images embedded as data: URIs, so the page can be moved).")
def compare_command(run_a: Path, run_b: Path, fail_above_pct: float | None, as_json: bool,
                    html_out: Path | None) -> None:
    def skip(problem: str) -> None:
        warn(problem)

    a_records, b_records = load_run(run_a, "A", skip), load_run(run_b, "B", skip)
    comparison = compare_runs(a_records, b_records)
    if not comparison.matched:
        raise HarnessError(f"no measurement of A '{run_a}' matches one of B '{run_b}' (same sampler, steps, "
                           "guidance, image size and images per call); compare runs made with the same settings.")
    warning = setup_warning(a_records, b_records)
    if warning:
        say(warning)
    click.echo(comparison_json(comparison) if as_json else comparison_markdown(comparison))
    if html_out is not None:
        write_html(html_out, (Side("A", run_a, a_records), Side("B", run_b, b_records)), comparison, warning)
    if fail_above_pct is not None:
        worst = worst_slowdown(comparison, fail_above_pct)
        if worst is not None:
            say(f"regression: {describe(worst.key)} is {worst.change_pct:.1f}% slower "
                f"({worst.a_seconds_per_image:.4g} -> {worst.b_seconds_per_image:.4g} s/image), "
                f"above --fail-above {fail_above_pct:g}%.")
            sys.exit(ExitCode.FAILED)
