"""``harness leaderboard RUN_DIR...``: several runs' samplers and LoRAs ranked by one quality metric, with latency.

Every successful measurement of the runs is a :class:`Row`: an entry (the sampler, plus the name of the LoRA it
loaded) at one step count, its median seconds per image, its metric values, its rank among the rows of the same
step count, whether it is on the Pareto front of quality against seconds, and, for a LoRA that ``harness train``
wrote, what training it cost. The runs must have scored the same prompts and seeds; anything else is refused in
one line before a file is written. Writes ``leaderboard.md``, ``leaderboard.json`` and ``leaderboard.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.records.files import write_folder_atomic, write_text_atomic
from harness.records.schema import Measured, successful
from harness.records.store import RECORDS_FILE
from harness.records.text import markdown_cell, markdown_code

if TYPE_CHECKING:
    from harness.reporting.plots import QualitySeries
from harness.reporting.markdown import markdown_table
from harness.reporting.runs import Run, check_comparable, lora_location, short_text
from harness.reporting.training_cost import TrainingCost, lora_name, training_cost

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_PLOT = "leaderboard.png"
@dataclass
class Row:
    """One (entry, steps) measurement on the leaderboard."""

    label: str
    sampler: str
    lora: str | None  # where the LoRA was loaded from, as the record names it
    run: str  # the run folder it was measured in
    baseline: bool
    steps: int
    guidance_scale: float
    seconds_per_image: float
    quality: float | None  # the ranking metric's value; None when the record has none
    quality_note: str  # why there is no value ("error", "skipped"), or ""
    metrics: dict[str, float | None]
    training: TrainingCost | None = None
    rank: int | None = None
    pareto: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "label": self.label, "sampler": self.sampler, "lora": self.lora, "run": self.run,
                "baseline": self.baseline, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "seconds_per_image": self.seconds_per_image, "value": _json_number(self.quality),
                "pareto": self.pareto, "metrics": {name: _json_number(value) for name, value in self.metrics.items()},
                "training": None if self.training is None else self.training.as_dict()}


@dataclass
class Leaderboard:
    metric: str
    higher_is_better: bool
    runs: list[str]
    rows: list[Row] = field(default_factory=list)
    other_metrics: list[str] = field(default_factory=list)

    def headers(self) -> list[str]:
        return ["rank", "entry", "steps", "guidance", "s/image", self.metric, *self.other_metrics, "Pareto",
                "train steps", "train min", "train steps/s"]

    def table_rows(self) -> list[list[str]]:
        cells = []
        for row in self.rows:
            cost = row.training
            cells.append([
                "" if row.rank is None else str(row.rank),
                row.label + (" (baseline)" if row.baseline else ""),
                str(row.steps),
                f"{row.guidance_scale:g}",
                f"{row.seconds_per_image:.4g}",
                _number(row.quality) or row.quality_note,
                *(_number(row.metrics.get(name)) for name in self.other_metrics),
                "yes" if row.pareto else "",
                _number(None if cost is None else cost.steps),
                _number(None if cost is None else cost.minutes, "{:.1f}"),
                _number(None if cost is None else cost.steps_per_s, "{:.3g}"),
            ])
        return cells

    def table(self) -> str:
        # Cells are formatted here already; tabulate must not re-parse "1.200" into 1.2.
        return markdown_table(self.table_rows(), self.headers(), disable_numparse=True)

    def markdown(self, plot: str | None) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        lines = [
            "# harness leaderboard",
            "",
            f"- runs: {', '.join(markdown_code(run) for run in self.runs)}",
            f"- ranked by {markdown_cell(self.metric)} ({direction} is better) among the rows of the same step count "
            "(1 = best); Pareto: no other row is both faster and better",
            "- s/image: the median seconds per image of the timed calls, as each run's summary.md; train: the "
            "optimizer steps, minutes and steps/s of the `harness train` run the LoRA came from (blank: not known)",
            "",
            self.table(),
            "",
        ]
        if plot is not None:
            lines += [f"![{markdown_cell(self.metric)} against seconds per image, Pareto front in red]({plot})", ""]
        return "\n".join(lines)

    def as_json(self) -> str:
        document = {"metric": self.metric, "higher_is_better": self.higher_is_better, "runs": self.runs,
                    "rows": [row.as_dict() for row in self.rows]}
        return json.dumps(document, indent=2, allow_nan=False) + "\n"

    def series(self) -> list[QualitySeries]:
        """One plot line per entry, its finite points by steps, in the order the table lists the entries."""
        from harness.reporting.plots import QualitySeries  # matplotlib loads only when a leaderboard is made
        by_label: dict[str, QualitySeries] = {}
        for row in self.rows:
            line = by_label.setdefault(row.label, QualitySeries(row.label, row.baseline, []))
            if row.quality is not None and math.isfinite(row.quality):
                line.points.append((row.steps, row.seconds_per_image, row.quality))
        for line in by_label.values():
            line.points.sort()
        return list(by_label.values())


def _json_number(value: float | None) -> float | str | None:
    """A metric value for strict JSON: an infinite one (PSNR of identical images) as the text "inf" or "-inf"."""
    return value if value is None or math.isfinite(value) else str(value)


def _number(value: float | None, form: str = "{:.4g}") -> str:
    return "" if value is None else form.format(value)


def metric_value(measured: Measured, name: str) -> float | None:
    """A metric's number, or None when the record has none (it failed, was skipped, or is not a finite number
    or infinity: NaN ranks nowhere)."""
    value = measured.metrics.get(name, {}).get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def choose_metric(runs: Sequence[Run], metric: str | None) -> tuple[str, bool]:
    """The ranking metric (the first one with a value when none is asked for) and whether higher is better."""
    measured_all = [measured for run in runs for _, measured in successful(run.records)]
    scored = list(dict.fromkeys(name for measured in measured_all for name in measured.metrics
                                if metric_value(measured, name) is not None))
    if metric is None:
        if not scored:
            raise HarnessError("no record of these runs has a quality metric value to rank by; evaluate them with "
                               "--metric NAME (e.g. harness eval ... --metric fidelity).")
        metric = scored[0]
    elif metric not in scored:
        notes = [str(result.get("error") or result.get("skipped")) for measured in measured_all
                 for result in [measured.metrics.get(metric, {})] if "error" in result or "skipped" in result]
        why = f" (e.g. {short_text(notes[0])})" if notes else ""
        fix = (f"they have {', '.join(scored)}: pass one of those to --metric, or evaluate the runs with --metric "
               f"{metric}." if scored else
               f"evaluate the runs with --metric {metric} (they have no metric value at all).")
        raise HarnessError(f"no record of these runs has a value for metric '{metric}'{why}; {fix}")
    direction = next((result["higher_is_better"] for measured in measured_all
                      for name, result in measured.metrics.items()
                      if name == metric and isinstance(result.get("higher_is_better"), bool)), True)
    return metric, direction


def _note(measured: Measured, name: str) -> str:
    result = measured.metrics.get(name, {})
    return "error" if "error" in result else "skipped" if "skipped" in result else ""


def build_leaderboard(runs: Sequence[Run], metric: str | None = None, labels: dict[int, str] | None = None,
                      on_warning: Callable[[str], None] = lambda _: None) -> Leaderboard:
    """Check the runs, then rank every successful measurement; ``labels`` names the entries of a run (by index)."""
    check_comparable(runs)
    metric, higher_is_better = choose_metric(runs, metric)
    labels = labels or {}
    rows: list[Row] = []
    entry_of: dict[int, tuple[Any, ...]] = {}  # row index -> the entry it belongs to
    baselines: set[tuple[str, str | None, int, float]] = set()
    costs: dict[tuple[int, str], TrainingCost | None] = {}
    names = list(dict.fromkeys(name for run in runs for _, measured in successful(run.records)
                               for name in measured.metrics))
    only_baselines = [all(record.baseline for record, _ in successful(run.records)) for run in runs]
    for index, run in enumerate(runs):
        for record in run.records:
            if record.measured is None:
                on_warning(f"'{run.path}': {record.sampler} at {record.steps} steps failed ({record.error}); "
                           "it is not on the leaderboard.")
        for record, measured in successful(run.records):
            lora = lora_location(measured)
            if record.baseline:
                # Every harness eval run measures the baseline: it is shown once, from the first run that has it.
                key = (record.sampler, lora, record.steps, record.guidance_scale)
                if key in baselines:
                    continue
                baselines.add(key)
            # --label names a run's few-step entries; a run of baselines alone (the teacher's) has only those.
            named = not record.baseline or only_baselines[index]
            name = (labels.get(index) if named else None) or (lora_name(lora) if lora else None)
            if lora is not None and (index, lora) not in costs:
                costs[index, lora] = training_cost(lora, run)
            entry_of[len(rows)] = (record.sampler, lora) if record.baseline else (index, record.sampler, lora)
            rows.append(Row(
                label=record.sampler + (f" ({name})" if name else ""), sampler=record.sampler, lora=lora,
                run=str(run.path), baseline=record.baseline, steps=record.steps,
                guidance_scale=record.guidance_scale, seconds_per_image=measured.timing.seconds_per_image,
                quality=metric_value(measured, metric), quality_note=_note(measured, metric),
                metrics={n: metric_value(measured, n) for n in names},
                training=costs.get((index, lora)) if lora is not None else None,
            ))
    _unique_labels(rows, entry_of)
    _rank(rows, higher_is_better)
    _mark_pareto(rows, higher_is_better)
    other = [name for name in dict.fromkeys(n for row in rows for n, v in row.metrics.items() if v is not None)
             if name != metric]
    return Leaderboard(metric, higher_is_better, [str(run.path) for run in runs], _ordered(rows), other)


def _unique_labels(rows: list[Row], entry_of: dict[int, tuple[Any, ...]]) -> None:
    """Two entries with one label (the same sampler and LoRA name in two runs) get their run folder's name added,
    or the run folder as given when those are equal too."""
    entries_by_label: dict[str, set[tuple[Any, ...]]] = {}
    for index, row in enumerate(rows):
        entries_by_label.setdefault(row.label, set()).add(entry_of[index])
    clashing = {label for label, entries in entries_by_label.items() if len(entries) > 1}
    for label in clashing:
        clashed = [row for row in rows if row.label == label]
        names = {Path(row.run).name for row in clashed}
        runs = {row.run for row in clashed}
        for row in clashed:
            row.label = f"{label} [{Path(row.run).name if len(names) == len(runs) else row.run}]"


def _rank(rows: Sequence[Row], higher_is_better: bool) -> None:
    """Rank the rows with a value among those of the same step count: 1 = best, ties share the better rank."""
    sign = 1 if higher_is_better else -1
    for steps in {row.steps for row in rows}:
        scored = [(sign * row.quality, row) for row in rows if row.steps == steps and row.quality is not None]
        for value, row in scored:
            row.rank = 1 + sum(1 for other, _ in scored if other > value)


def _mark_pareto(rows: Sequence[Row], higher_is_better: bool) -> None:
    """Flag the rows no other row beats on both seconds per image and the metric (plots.pareto_front)."""
    from harness.reporting.plots import QualityPoint, pareto_front
    by_point = [(QualityPoint(row.label, row.seconds_per_image, row.quality), row) for row in rows
                if row.quality is not None]
    on_front = {id(point) for point in pareto_front([point for point, _ in by_point], higher_is_better)}
    for point, row in by_point:
        row.pareto = id(point) in on_front


def _ordered(rows: Sequence[Row]) -> list[Row]:
    """Step counts with a baseline first (it is the reference on top), then the others by steps; within each,
    by rank (rows without a value last)."""
    with_baseline = {row.steps for row in rows if row.baseline}
    return sorted(rows, key=lambda row: (row.steps not in with_baseline, row.steps,
                                         row.rank is None, row.rank or 0, row.label))


def parse_labels(values: Sequence[str], runs: Sequence[Run]) -> dict[int, str]:
    """``--label RUN_DIR=NAME`` (NAME=RUN_DIR works too) as {run index: NAME}."""
    folders = {run.folder.resolve(): index for index, run in enumerate(runs)}

    def run_index(text: str) -> int | None:
        path = Path(text)
        if path.name == RECORDS_FILE and not path.is_dir():
            path = path.parent
        return folders.get(path.resolve()) if text else None

    labels: dict[int, str] = {}
    for value in values:
        splits = [(value[:i], value[i + 1:]) for i, char in enumerate(value) if char == "="]
        found = next(((run_index(left), right) for left, right in splits if run_index(left) is not None and right),
                     None) or next(((run_index(right), left) for left, right in splits
                                    if run_index(right) is not None and left), None)
        if found is None or found[0] is None:
            raise HarnessError(f"--label '{value}' does not name one of the runs given; pass --label RUN_DIR=NAME "
                               "with RUN_DIR as given on the command line.")
        labels[found[0]] = found[1]
    return labels


def default_outdir() -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"{stamp}-leaderboard"


def write_leaderboard(outdir: Path, board: Leaderboard, plot_title: str) -> list[Path]:
    """Write the three files into ``outdir``: all three are made in a hidden staging folder first and then
    renamed into place, so a failure leaves no file half-written (and none of a new set beside an old one)."""
    from harness.reporting.plots import write_quality_series_plot

    def write(folder: Path) -> None:
        plot = write_quality_series_plot(folder / LEADERBOARD_PLOT, board.series(), board.metric,
                                         board.higher_is_better, f"{board.metric} against latency: {plot_title}")
        write_text_atomic(folder / LEADERBOARD_MD, board.markdown(None if plot is None else plot.name))
        write_text_atomic(folder / LEADERBOARD_JSON, board.as_json())

    try:
        if not outdir.exists():
            write_folder_atomic(outdir, write)
            return sorted(outdir.iterdir())
        if not outdir.is_dir():
            raise HarnessError(f"--outdir '{outdir}' is a file; pass a folder.")
        staging = Path(tempfile.mkdtemp(prefix=".leaderboard-", dir=outdir))
        try:
            write(staging)
            written = sorted(staging.iterdir())
            for path in written:
                os.replace(path, outdir / path.name)
            for name in {LEADERBOARD_PLOT} - {path.name for path in written}:
                (outdir / name).unlink(missing_ok=True)  # an earlier leaderboard's plot: this one has none
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return [outdir / path.name for path in written]
    except OSError as error:
        raise HarnessError(f"cannot write to '{outdir}': {error.strerror or error}; "
                           "pass a writable --outdir.") from None


