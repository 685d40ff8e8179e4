"""``harness compare A B``: the timings of two runs side by side, and a regression verdict for CI."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import click
from tabulate import tabulate

from harness.errors import HarnessError
from harness.records import SCHEMA, read_records


class MeasurementKey(NamedTuple):
    """What fixes the work behind one image, so equal keys make two medians comparable.

    Prompts are left out on purpose: SD pads every prompt to the same token length and each call
    draws one prompt, so their text and number change only how many samples the median has.
    """

    sampler: str
    steps: int
    guidance_scale: float  # above 1 the pipeline runs classifier-free guidance: twice the UNet batch
    image_size: str
    images_per_call: int


def measurement_key(record: dict[str, Any]) -> MeasurementKey:
    width, height = record["image_size"]
    return MeasurementKey(record["sampler"], record["steps"], record["guidance_scale"], f"{width}x{height}",
                          record["timing"]["images_per_call"])


@dataclass(frozen=True)
class Match:
    key: MeasurementKey
    a_seconds_per_image: float
    b_seconds_per_image: float

    @property
    def ratio(self) -> float:
        return self.b_seconds_per_image / self.a_seconds_per_image

    @property
    def change_pct(self) -> float:
        return (self.ratio - 1) * 100


@dataclass(frozen=True)
class Unmatched:
    side: str  # "A" or "B"
    record: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class Comparison:
    matched: list[Match]
    unmatched: list[Unmatched]


def load_run(path: Path, side: str) -> list[dict[str, Any]]:
    """The records of one side, refused with a one-line fix when they cannot be compared."""
    records = read_records(path)
    if not records:
        raise HarnessError(f"{side} '{path}' holds no records; pass the folder of a finished `harness bench` run.")
    if any(not isinstance(record, dict) or record.get("schema") != SCHEMA for record in records):
        raise HarnessError(f"{side} '{path}' holds lines that are not {SCHEMA} records; "
                           "pass a records.jsonl written by `harness bench`.")
    seen: set[MeasurementKey] = set()
    for key in (measurement_key(record) for record in records if record["status"] == "ok"):
        if key in seen:
            raise HarnessError(f"{side} '{path}' measures {describe(key)} twice; "
                               "compare one run per side, not records of several runs joined.")
        seen.add(key)
    return records


def describe(key: MeasurementKey) -> str:
    return (f"{key.sampler} {key.steps} steps (guidance {key.guidance_scale:g}, {key.image_size}, "
            f"{key.images_per_call} image(s)/call)")


def compare_runs(a_records: Sequence[dict[str, Any]], b_records: Sequence[dict[str, Any]]) -> Comparison:
    """Pair the successful measurements of A and B by key; keep what has no partner and what failed."""
    a_ok = {measurement_key(r): r for r in a_records if r["status"] == "ok"}
    b_ok = {measurement_key(r): r for r in b_records if r["status"] == "ok"}
    matched = [
        Match(key, record["timing"]["seconds_per_image"], b_ok[key]["timing"]["seconds_per_image"])
        for key, record in a_ok.items() if key in b_ok
    ]
    unmatched = []
    for side, records, other_side, other_ok in (("A", a_records, "B", b_ok), ("B", b_records, "A", a_ok)):
        for record in records:
            if record["status"] != "ok":
                unmatched.append(Unmatched(side, record, f"failed: {record['error']}"))
            elif measurement_key(record) not in other_ok:
                unmatched.append(Unmatched(side, record, f"not in {other_side}"))
    return Comparison(matched, unmatched)


def _setups(records: Sequence[dict[str, Any]]) -> set[str]:
    return {f"{r['config']['model']} on {r['environment'].get('device_name')} ({r['environment'].get('dtype')})"
            + (f" x {r['world_size']} processes" if r.get("world_size", 1) > 1 else "")
            for r in records}


def setup_warning(a_records: Sequence[dict[str, Any]], b_records: Sequence[dict[str, Any]]) -> str | None:
    """One line when the runs differ in model, device, dtype or processes: the ratios then measure that too."""
    a_setups, b_setups = _setups(a_records), _setups(b_records)
    if a_setups == b_setups:
        return None
    return (f"warning: A ran {'; '.join(sorted(a_setups))} but B ran {'; '.join(sorted(b_setups))}; "
            "the ratios compare the setups, not only the change.")


def worst_slowdown(comparison: Comparison, fail_above_pct: float) -> Match | None:
    """The match that slowed the most, when it slowed by more than ``fail_above_pct`` percent."""
    worst = max(comparison.matched, key=lambda match: match.change_pct, default=None)
    if worst is None or worst.change_pct <= fail_above_pct:
        return None
    return worst


KEY_HEADERS = ["sampler", "steps", "guidance", "size", "images/call"]


def _key_cells(key: MeasurementKey) -> list[Any]:
    return [key.sampler, key.steps, f"{key.guidance_scale:g}", key.image_size, key.images_per_call]


def _record_cells(record: dict[str, Any]) -> list[Any]:
    if record["status"] == "ok":
        return _key_cells(measurement_key(record))
    return [record["sampler"], record["steps"], f"{record['guidance_scale']:g}", "", ""]  # no size, no timing


def _seconds(value: float) -> str:
    return f"{value:.4g}"


def _markdown(rows: list[list[Any]], headers: list[str]) -> str:
    # Cells are formatted here already; tabulate must not re-parse "1.200" into 1.2.
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def comparison_markdown(comparison: Comparison) -> str:
    """The matched medians as a GitHub markdown table, then what was not compared, and why."""
    rows = [[*_key_cells(match.key), _seconds(match.a_seconds_per_image),
             _seconds(match.b_seconds_per_image), f"{match.ratio:.3f}", f"{match.change_pct:+.1f}%"]
            for match in comparison.matched]
    text = _markdown(rows, [*KEY_HEADERS, "A s/image", "B s/image", "B/A", "change"])
    if comparison.unmatched:
        rows = [[item.side, *_record_cells(item.record),
                 _seconds(item.record["timing"]["seconds_per_image"]) if item.record["status"] == "ok" else "",
                 item.reason] for item in comparison.unmatched]
        text += "\n\nNot compared:\n\n" + _markdown(rows, ["run", *KEY_HEADERS, "s/image", "why"])
    return text


def comparison_json(comparison: Comparison) -> str:
    matched = [{**match.key._asdict(), "a_seconds_per_image": match.a_seconds_per_image,
                "b_seconds_per_image": match.b_seconds_per_image, "ratio": match.ratio,
                "change_pct": match.change_pct} for match in comparison.matched]
    unmatched = [{"run": item.side, "sampler": item.record["sampler"], "steps": item.record["steps"],
                  "guidance_scale": item.record["guidance_scale"], "status": item.record["status"],
                  "why": item.reason} for item in comparison.unmatched]
    return json.dumps({"matched": matched, "not_compared": unmatched}, indent=2)


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
@click.option("--fail-above", "fail_above_pct", type=click.FloatRange(min=0), metavar="PCT",
              help="Exit with code 1 when any matched median is more than PCT percent slower in B.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of tables.")
def compare_command(run_a: Path, run_b: Path, fail_above_pct: float | None, as_json: bool) -> None:
    a_records, b_records = load_run(run_a, "A"), load_run(run_b, "B")
    comparison = compare_runs(a_records, b_records)
    if not comparison.matched:
        raise HarnessError(f"no measurement of A '{run_a}' matches one of B '{run_b}' (same sampler, steps, "
                           "guidance, image size and images per call); compare runs made with the same settings.")
    warning = setup_warning(a_records, b_records)
    if warning:
        click.echo(warning, err=True)
    click.echo(comparison_json(comparison) if as_json else comparison_markdown(comparison))
    if fail_above_pct is not None:
        worst = worst_slowdown(comparison, fail_above_pct)
        if worst is not None:
            click.echo(f"regression: {describe(worst.key)} is {worst.change_pct:.1f}% slower "
                       f"({worst.a_seconds_per_image:.4g} -> {worst.b_seconds_per_image:.4g} s/image), "
                       f"above --fail-above {fail_above_pct:g}%.", err=True)
            sys.exit(1)
