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
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import click
from tabulate import tabulate

from harness.errors import HarnessError
from harness.records.files import write_folder_atomic, write_text_atomic
from harness.records.schema import Measured, Record, successful
from harness.records.store import RECORDS_FILE, read_records
from harness.records.training_run import TrainingRun

if TYPE_CHECKING:
    from harness.reporting.plots import QualitySeries

LEADERBOARD_MD = "leaderboard.md"
LEADERBOARD_JSON = "leaderboard.json"
LEADERBOARD_PLOT = "leaderboard.png"
# What harness.training.trainer writes into a training run folder (not imported: it pulls in accelerate).
# A LoRA lies at RUN/lora/final or RUN/lora/checkpoint-N: its training run is at most this many folders up.
RUN_FOLDER_LEVELS = 2
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_FINAL = "final"


@dataclass(frozen=True)
class Run:
    """One input: the path as given and its records."""

    path: Path
    records: list[Record]

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path.name == RECORDS_FILE and not self.path.is_dir() else self.path


@dataclass(frozen=True)
class TrainingCost:
    """What the ``harness train`` run behind a LoRA cost, up to the checkpoint the LoRA is."""

    run_dir: str
    trainer: str | None
    steps: int | None  # optimizer steps
    seconds: float | None  # training time (train_log.jsonl's ``seconds``, across resumes)

    @property
    def minutes(self) -> float | None:
        return None if self.seconds is None else self.seconds / 60

    @property
    def steps_per_s(self) -> float | None:
        if self.steps is None or not self.seconds:
            return None
        return self.steps / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "trainer": self.trainer, "steps": self.steps, "seconds": self.seconds,
                "minutes": self.minutes, "steps_per_s": self.steps_per_s}


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
        return tabulate(self.table_rows(), headers=self.headers(), tablefmt="github", disable_numparse=True)

    def markdown(self, plot: str | None) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        lines = [
            "# harness leaderboard",
            "",
            f"- runs: {', '.join(f'`{run}`' for run in self.runs)}",
            f"- ranked by {self.metric} ({direction} is better) among the rows of the same step count (1 = best); "
            "Pareto: no other row is both faster and better",
            "- s/image: the median seconds per image of the timed calls, as each run's summary.md; train: the "
            "optimizer steps, minutes and steps/s of the `harness train` run the LoRA came from (blank: not known)",
            "",
            self.table(),
            "",
        ]
        if plot is not None:
            lines += [f"![{self.metric} against seconds per image, Pareto front in red]({plot})", ""]
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


def load_runs(paths: Sequence[Path], on_warning: Callable[[str], None]) -> list[Run]:
    """Every run's records (a line that is not a record is skipped through ``on_warning``), refused in one line
    when a run is given twice, holds no record, or measures the same thing twice."""
    runs: list[Run] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        records = read_records(path, on_skip=on_warning)
        run = Run(Path(path), records)
        key = run.folder.resolve()
        if key in seen:
            raise HarnessError(f"'{path}' is the same run as '{seen[key]}'; pass each run folder once.")
        seen[key] = run.path
        if not records:
            raise HarnessError(f"'{path}' holds no records; pass the folder of a finished `harness eval` or "
                               "`harness bench` run.")
        keys: set[tuple[str, str | None, int, float]] = set()
        for record, measured in successful(records):
            measurement = (record.sampler, lora_location(measured), record.steps, record.guidance_scale)
            if measurement in keys:
                raise HarnessError(f"'{path}' measures {record.sampler} at {record.steps} steps twice; pass one "
                                   "run per folder, not the records of several runs joined.")
            keys.add(measurement)
        runs.append(run)
    return runs


def _draws(record: Record) -> tuple[Any, Any, Any]:
    """What fixes the images a measurement scores: the prompts, the seed and the images per prompt (image i of
    prompt p draws from seed + p * num_images + i)."""
    config = record.config
    return config.get("prompts"), config.get("seed"), config.get("num_images")


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse runs that scored other prompts or seeds than the first run: their metric values differ by more
    than the sampler."""
    first_run = runs[0]
    reference = _draws(first_run.records[0])
    for run in runs:
        for record in run.records:
            draws = _draws(record)
            if draws != reference:
                raise HarnessError(f"runs '{first_run.path}' and '{run.path}' did not score the same prompts and "
                                   f"seeds ({_difference(reference, draws)}); rerun '{run.path}' with the --prompts, "
                                   f"--seed and --num_images of '{first_run.path}'.")


def _difference(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any]) -> str:
    (a_prompts, a_seed, a_images), (b_prompts, b_seed, b_images) = a, b
    if a_prompts != b_prompts:
        if not isinstance(a_prompts, list) or not isinstance(b_prompts, list) or len(a_prompts) != len(b_prompts):
            return f"{_count(a_prompts)} against {_count(b_prompts)} prompts"
        index = next(i for i, (x, y) in enumerate(zip(a_prompts, b_prompts)) if x != y)
        return f"prompt {index + 1}: {_short(a_prompts[index])} against {_short(b_prompts[index])}"
    if a_seed != b_seed:
        return f"seed {a_seed} against {b_seed}"
    return f"{a_images} against {b_images} image(s) per prompt"


def _count(prompts: Any) -> str:
    return str(len(prompts)) if isinstance(prompts, list) else "no recorded"


def _short(text: Any) -> str:
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def setup_warning(runs: Sequence[Run]) -> str | None:
    """One line when the runs differ in model, device, dtype or image size: the rows then differ by that too."""
    setups: dict[str, str] = {}
    for run in runs:
        for record, measured in successful(run.records):
            width, height = measured.image_size
            setup = (f"{record.config.get('model')} on {record.environment.get('device_name')} "
                     f"({record.environment.get('dtype')}), {width}x{height}")
            setups.setdefault(setup, str(run.path))
    if len(setups) < 2:
        return None
    described = "; ".join(f"'{run}' {setup}" for setup, run in setups.items())
    return f"warning: the runs differ in model, device, dtype or image size ({described}); the rows differ by that too."


def title(runs: Sequence[Run]) -> str:
    record, measured = next(pair for run in runs for pair in successful(run.records))
    width, height = measured.image_size
    return (f"{record.config.get('model')} on {record.environment.get('device_name')} "
            f"({record.environment.get('dtype')}), {width}x{height}")


def lora_location(measured: Measured) -> str | None:
    """Where the measurement's LoRA was loaded from (a folder, a folder/file or a hub id), or None without one."""
    lora = measured.sampler_info.get("lora")
    return lora if isinstance(lora, str) and lora else None


def _lora_folder(location: str) -> PurePath:
    path = PurePath(location)
    return path.parent if path.suffix == ".safetensors" else path


def lora_name(location: str) -> str:
    """A short name for a LoRA: RUN for ``.../RUN/lora/final``, ``RUN checkpoint-N`` for a checkpoint of it,
    else the last part of the path or hub id."""
    path = _lora_folder(location)
    if (path.name == _FINAL or _CHECKPOINT.fullmatch(path.name)) and len(path.parts) >= 3:
        run = path.parent.parent.name
        return run if path.name == _FINAL else f"{run} {path.name}"
    return path.name or location


def _candidates(location: str, run: Run) -> list[Path]:
    """Where a LoRA location from a record may be now: as written, and, for a relative one, also from the folder
    the run was started in (found by taking the run's recorded --outdir off the run folder's path)."""
    path = Path(location).expanduser()
    found = [path]
    outdir = next((record.config.get("outdir") for record in run.records), None)
    if not path.is_absolute() and isinstance(outdir, str) and not Path(outdir).is_absolute():
        folder = run.folder.resolve()
        parts = Path(outdir).parts
        if parts and folder.parts[-len(parts):] == parts:
            found.append(Path(*folder.parts[:-len(parts)]) / path)
    return found


def find_training_run(location: str, run: Run) -> Path | None:
    """The ``harness train`` run folder a LoRA lies in (it holds train_log.jsonl, or a config.json naming a
    trainer), looking at most RUN_FOLDER_LEVELS folders up from the LoRA's own; None when there is none."""
    try:
        for candidate in _candidates(location, run):
            folder = candidate.parent if candidate.suffix == ".safetensors" else candidate
            if not folder.is_dir():
                continue
            for level in (folder, *folder.parents[:RUN_FOLDER_LEVELS]):
                if TrainingRun.holds_run(level):
                    return level
    except (OSError, RuntimeError):  # a location no folder can have: a name too long, '~user' of no user
        pass
    return None


def training_cost(location: str, run: Run) -> TrainingCost | None:
    """The cost of the training run behind a LoRA: up to its checkpoint-N, or the whole run for ``final``."""
    folder = find_training_run(location, run)
    if folder is None:
        return None
    logged = TrainingRun(folder).step_seconds()
    checkpoint = _CHECKPOINT.fullmatch(_lora_folder(location).name)
    steps: int | None
    seconds: float | None
    if checkpoint is not None:
        steps = int(checkpoint.group(1))
        seconds = next((s for step, s in reversed(logged) if step == steps), None)
    elif logged:
        steps, seconds = logged[-1]
    else:
        steps, seconds = None, None
    return TrainingCost(str(folder), TrainingRun(folder).trainer(), steps, seconds)


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
        why = f" (e.g. {_short(notes[0])})" if notes else ""
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


LEADERBOARD_HELP = """Rank the samplers and LoRAs of several runs by a quality metric, beside their latency.

RUN_DIR... are folders of `harness eval` or `harness bench` runs (or their records.jsonl) scored with the
same --metric on the same prompts and seeds (--prompts, --seed, --num_images); runs that differ are refused.
Every successful measurement is a row: the entry (the sampler, plus its LoRA's name: RUN for a LoRA at
.../RUN/lora/final), steps, guidance, median seconds per image, the metric and every other metric the records
hold, the rank by the metric among the rows of the same step count (1 = best), whether the row is on the
Pareto front of quality against seconds per image, and, for a LoRA that `harness train` wrote, the optimizer
steps, minutes and steps/s its training took. A baseline that several runs measured (each `harness eval`
measures one) is shown once, from the first run given that has it, on top.

Writes leaderboard.md, leaderboard.json and leaderboard.png (the metric against seconds per image, one line
per entry across step counts, the Pareto front in red) into --outdir, and prints the table.

\b
Example:
  harness eval --lora_path checkpoints/distill/lora/final --steps 1 2 4 8 --metric fidelity --outdir runs/distill
  harness leaderboard runs/teacher runs/distill runs/lcm runs/flash --metric fidelity"""


@click.command(name="leaderboard", help=LEADERBOARD_HELP)
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--metric", metavar="NAME",
              help="The metric to rank by (default: the first one the records have values for).")
@click.option("--label", "labels", metavar="RUN_DIR=NAME", multiple=True,
              help="Name the few-step entries of one run (of a run with baselines only, its baselines): their "
                   "rows read 'SAMPLER (NAME)' instead of 'SAMPLER (LORA NAME)'. Repeatable.")
@click.option("--outdir", type=click.Path(path_type=Path), metavar="DIR",
              help="Where the three files go (default: results/<UTC time>-leaderboard).")
def leaderboard_command(run_dirs: tuple[Path, ...], metric: str | None, labels: tuple[str, ...],
                        outdir: Path | None) -> None:
    def warn(problem: str) -> None:
        click.echo(f"Warning: {problem}", err=True)

    runs = load_runs(run_dirs, warn)
    board = build_leaderboard(runs, metric, parse_labels(labels, runs), warn)
    warning = setup_warning(runs)
    if warning:
        click.echo(warning, err=True)
    outdir = outdir if outdir is not None else default_outdir()
    write_leaderboard(outdir, board, title(runs))
    click.echo(board.table())
    click.echo(f"\n{LEADERBOARD_MD}, {LEADERBOARD_JSON} and {LEADERBOARD_PLOT} in {outdir}", err=True)
