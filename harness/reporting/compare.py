"""``harness compare A B``: the timings of two runs side by side, and a regression verdict for CI."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from harness.errors import HarnessError
from harness.records.schema import Measured, Record, successful
from harness.records.store import read_records
from harness.reporting.markdown import markdown_table


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


def measurement_key(record: Record, measured: Measured) -> MeasurementKey:
    width, height = measured.image_size
    return MeasurementKey(record.sampler, record.steps, record.guidance_scale, f"{width}x{height}",
                          measured.timing.images_per_call)


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
    record: Record
    reason: str


@dataclass(frozen=True)
class Comparison:
    matched: list[Match]
    unmatched: list[Unmatched]


def load_run(path: Path, side: str, on_skip: Callable[[str], None] = lambda _: None) -> list[Record]:
    """The records of one side (a line that is not a record is skipped through ``on_skip``), refused with a
    one-line fix when they cannot be compared."""
    records = read_records(path, on_skip=on_skip)
    if not records:
        raise HarnessError(f"{side} '{path}' holds no records; pass the folder of a finished `harness bench` run.")
    seen: set[MeasurementKey] = set()
    for key in (measurement_key(record, measured) for record, measured in successful(records)):
        if key in seen:
            raise HarnessError(f"{side} '{path}' measures {describe(key)} twice; "
                               "compare one run per side, not records of several runs joined.")
        seen.add(key)
    return records


def describe(key: MeasurementKey) -> str:
    return (f"{key.sampler} {key.steps} steps (guidance {key.guidance_scale:g}, {key.image_size}, "
            f"{key.images_per_call} image(s)/call)")


def _by_key(records: Sequence[Record]) -> dict[MeasurementKey, Measured]:
    return {measurement_key(record, measured): measured for record, measured in successful(records)}


def compare_runs(a_records: Sequence[Record], b_records: Sequence[Record]) -> Comparison:
    """Pair the successful measurements of A and B by key; keep what has no partner and what failed."""
    a_ok, b_ok = _by_key(a_records), _by_key(b_records)
    matched = [
        Match(key, measured.timing.seconds_per_image, b_ok[key].timing.seconds_per_image)
        for key, measured in a_ok.items() if key in b_ok
    ]
    unmatched = []
    for side, records, other_side, other_ok in (("A", a_records, "B", b_ok), ("B", b_records, "A", a_ok)):
        for record in records:
            if record.measured is None:
                unmatched.append(Unmatched(side, record, f"failed: {record.error}"))
            elif measurement_key(record, record.measured) not in other_ok:
                unmatched.append(Unmatched(side, record, f"not in {other_side}"))
    return Comparison(matched, unmatched)


def _setups(records: Sequence[Record]) -> set[str]:
    return {f"{r.config.get('model')} on {r.environment.get('device_name')} ({r.environment.get('dtype')})"
            + (f" x {r.world_size} processes" if r.world_size > 1 else "")
            for r in records}


def setup_warning(a_records: Sequence[Record], b_records: Sequence[Record]) -> str | None:
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


def _record_cells(record: Record) -> list[Any]:
    if record.measured is not None:
        return _key_cells(measurement_key(record, record.measured))
    return [record.sampler, record.steps, f"{record.guidance_scale:g}", "", ""]  # no size, no timing


def _seconds(value: float) -> str:
    return f"{value:.4g}"


def _markdown(rows: list[list[Any]], headers: list[str]) -> str:
    # Cells are formatted here already; tabulate must not re-parse "1.200" into 1.2.
    return markdown_table(rows, headers, disable_numparse=True)


MATCHED_HEADERS = [*KEY_HEADERS, "A s/image", "B s/image", "B/A", "change"]
UNMATCHED_HEADERS = ["run", *KEY_HEADERS, "s/image", "why"]


def matched_rows(comparison: Comparison) -> list[list[Any]]:
    """One formatted row per matched measurement, shared by the text table and the HTML page."""
    return [[*_key_cells(match.key), _seconds(match.a_seconds_per_image),
             _seconds(match.b_seconds_per_image), f"{match.ratio:.3f}", f"{match.change_pct:+.1f}%"]
            for match in comparison.matched]


def unmatched_rows(comparison: Comparison) -> list[list[Any]]:
    """One row per measurement only one run has, or that failed, with the reason."""
    return [[item.side, *_record_cells(item.record),
             _seconds(item.record.measured.timing.seconds_per_image) if item.record.measured is not None else "",
             item.reason] for item in comparison.unmatched]


def comparison_markdown(comparison: Comparison) -> str:
    """The matched medians as a GitHub markdown table, then what was not compared, and why."""
    text = _markdown(matched_rows(comparison), MATCHED_HEADERS)
    if comparison.unmatched:
        text += "\n\nNot compared:\n\n" + _markdown(unmatched_rows(comparison), UNMATCHED_HEADERS)
    return text


def comparison_json(comparison: Comparison) -> str:
    matched = [{**match.key._asdict(), "a_seconds_per_image": match.a_seconds_per_image,
                "b_seconds_per_image": match.b_seconds_per_image, "ratio": match.ratio,
                "change_pct": match.change_pct} for match in comparison.matched]
    unmatched = [{"run": item.side, "sampler": item.record.sampler, "steps": item.record.steps,
                  "guidance_scale": item.record.guidance_scale, "status": item.record.status,
                  "why": item.reason} for item in comparison.unmatched]
    return json.dumps({"matched": matched, "not_compared": unmatched}, indent=2)


