"""Markdown tables and image grids, made from records alone (so ``harness report`` can redo them)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from harness.errors import HarnessError, one_line
from harness.records.files import write_text_atomic
from harness.records.schema import Measured, Memory, Record, successful, successful_baselines
from harness.records.store import RECORDS_FILE, SUMMARY_FILE, read_records
from harness.records.text import markdown_cell, markdown_code
from harness.reporting.grids import GridLimitError, write_grids
from harness.reporting.markdown import markdown_table

MAX_REPORT_IMAGES = 4096


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


NOISY_STDEV = 0.05  # a stdev above 5% of the median makes a comparison untrustworthy


def ideal_speedup(measured: Measured, baseline: Measured) -> float:
    """The speedup over the baseline if only the number of UNet evaluations changed.

    Takes the baseline's instrumented call, keeps its text encoding, decoding and other fixed costs,
    and scales its denoising time by the ratio of UNet evaluations (batch sizes summed).
    """
    stages = baseline.stages
    fixed = stages.total_s - stages.denoise_s
    ratio = measured.unet.evaluations / baseline.unet.evaluations
    ideal_s = fixed + stages.denoise_s * ratio
    return stages.total_s / ideal_s if ideal_s else math.inf  # no UNet evaluation against a call of denoising only


def spread(measured: Measured) -> float:
    """The stdev of the measured calls as a fraction of their median."""
    stats = measured.timing.seconds_per_call
    return stats.stdev / stats.median


def summary_rows(records: Sequence[Record]) -> tuple[list[str], list[list[Any]]]:
    """The timing table's headers and one row per record, shared by summary.md and the HTML page.

    A failed record's row ends with its error after the guidance column (shorter than the others)."""
    baselines = successful_baselines(records)
    baseline = baselines[0][1] if baselines else None
    several = processes(records) > 1  # one process's images/s is its own; several add up
    metric_names = list(dict.fromkeys(name for _, measured in successful(records) for name in measured.metrics))
    rows = []
    for record in records:
        measured = record.measured
        if measured is None:
            rows.append([record.sampler, record.steps, record.guidance_scale, "", f"failed: {record.error}"])
            continue
        timing = measured.timing
        speedup = ideal = ""
        if baseline is not None and not record.baseline and baseline.unet.evaluations:
            speedup = f"{baseline.timing.seconds_per_image / timing.seconds_per_image:.2f}x"
            ideal = f"{ideal_speedup(measured, baseline):.2f}x"
        row = [
            record.sampler + (NONFINITE_MARK if nonfinite(measured) else ""),
            record.steps,
            record.guidance_scale,
            measured.unet.evaluations_per_image,
            _ms(timing.seconds_per_image),
            f"{timing.images_per_s:.2f}",
            f"{spread(measured):.1%}" + (" !" if spread(measured) > NOISY_STDEV else ""),
            _ms(timing.seconds_per_call.p90 / timing.images_per_call),
            _ms(timing.first_call_s),
            f"{timing.load_s:.2f}",
            _memory(measured.memory),
            speedup,
            ideal,
        ]
        if several:
            row.append(_rate(timing.aggregate_images_per_s))
        rows.append(row + [_metric_cell(measured.metrics.get(name, {})) for name in metric_names])
    headers = ["sampler", "steps", "guidance", "UNet evals/image", "ms/image", "images/s", "stdev",
               "p90 ms/image", "first call ms", "load s", "peak MB", "speedup", "ideal speedup"]
    if several:
        headers.append("aggregate images/s")
    return headers + metric_names, rows


def summary_table(records: Sequence[Record]) -> str:
    """The run's timing table in GitHub markdown; few-step rows show their speedup over the baseline."""
    headers, rows = summary_rows(records)
    return markdown_table(rows, headers)


def processes(records: Sequence[Record]) -> int:
    """How many processes measured the run (1 for a plain harness bench)."""
    return max((record.world_size for record, _ in successful(records)), default=1)


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _metric_cell(result: dict[str, Any]) -> str:
    value = result.get("value")  # null: a metric that gave no number
    if value is None:
        return "error" if "error" in result else ""
    return f"{value:.4g}"


def stage_rows(records: Sequence[Record]) -> tuple[list[str], list[list[Any]]]:
    """The stage table's headers and one row per successful record, shared by summary.md and the HTML page."""
    rows = []
    for record, measured in successful(records):
        stages = measured.stages
        steps = stages.per_step_s
        rows.append([record.sampler, record.steps, _ms(stages.text_encode_s), _ms(stages.denoise_s),
                     _ms(sum(steps) / len(steps)) if steps else "", _ms(stages.decode_s), _ms(stages.other_s),
                     _ms(stages.total_s)])
    headers = ["sampler", "steps", "text encode ms", "denoise ms", "ms/step", "VAE decode ms", "other ms", "total ms"]
    return headers, rows


def stage_table(records: Sequence[Record]) -> str:
    """Where the time of one instrumented call goes, stage by stage."""
    headers, rows = stage_rows(records)
    return markdown_table(rows, headers)


def _memory(memory: Memory) -> str:
    value = memory.peak_mb
    return "" if value is None else f"{value:.0f}"


NOISY_NOTE = ("! stdev above 5% of the median: too noisy to compare; rerun with more --repeats or on a "
              "quieter machine.")


NONFINITE_MARK = " (NaN)"
NONFINITE_NOTE = ("(NaN) the UNet or the VAE decoder gave NaN or inf values in the instrumented call: blank images "
                  "or a sampler that does not work as it should, so its timing says little; the record's warnings say "
                  "more.")


def nonfinite(measured: Measured) -> bool:
    """Whether the measurement's instrumented call met NaN or inf (the tables mark it with ``(NaN)``)."""
    return bool(measured.stages.nonfinite_unet_calls or measured.stages.nonfinite_images)


def any_nonfinite(records: Sequence[Record]) -> bool:
    return any(nonfinite(measured) for _, measured in successful(records))


def any_noisy(records: Sequence[Record]) -> bool:
    """Whether some measurement is too noisy to compare (the tables mark it with ``!``)."""
    return any(spread(measured) > NOISY_STDEV for _, measured in successful(records))


def summary_markdown(records: Sequence[Record]) -> str:
    if not records:
        return "# harness bench\n\nNo measurements.\n"
    ok = successful(records)
    first = ok[0][0] if ok else records[0]
    config = first.config
    env = first.environment
    width, height = ok[0][1].image_size if ok else ("?", "?")
    lines = [
        "# harness bench",
        "",
        f"- model: {markdown_code(config.get('model'))}; device: {markdown_cell(env.get('device_name', ''))} "
        f"({markdown_cell(env.get('device', ''))}, {markdown_cell(env.get('dtype', ''))}); images {width}x{height}",
        f"- {prompt_count(config)} prompt(s) x {config.get('num_images')} image(s) per call; seed "
        f"{config.get('seed')}; {config.get('warmup')} warmup call(s), {config.get('repeats')} measured pass(es)",
        "- ms/image: median call / images per call, each call bracketed by a device synchronize; stdev in % of "
        "the median; speedup: baseline ms/image / this ms/image; ideal speedup: the baseline's own stage "
        "times with only the UNet evaluations scaled",
    ]
    world = processes(records)
    if world > 1:
        lines.append(f"- {world} processes, each timing its share of the calls: ms/image, stdev and p90 over "
                     "the calls of every rank, load and first call the median over ranks, peak memory the largest "
                     "rank's; aggregate images/s: every measured image of every rank over the wall clock from the "
                     "first rank's first measured call to the last rank's last")
    lines += ["", summary_table(records), ""]
    if any_noisy(records):
        lines += [NOISY_NOTE, ""]
    if any_nonfinite(records):
        lines += [NONFINITE_NOTE, ""]
    if ok:
        lines += ["## Stages (one extra instrumented call, synchronized at each stage boundary)", "",
                  stage_table(records), ""]
    return "\n".join(lines)


def write_summary(run_dir: Path, records: Sequence[Record]) -> list[OSError]:
    """Write the plots and ``summary.md`` (which links each plot written); return the errors of the files that
    could not be written (each names its file), so no caller can say a file was written that was not.

    A plot that cannot be written is left out of ``summary.md`` rather than linked; the summary is still written.
    """
    from harness.reporting.plots import write_latency_plot, write_quality_plot

    failed: list[OSError] = []

    def plot(write: Callable[[], Path | None]) -> Path | None:
        try:
            return write()
        except OSError as error:
            failed.append(error)
            return None

    run_dir = Path(run_dir)
    text = summary_markdown(records)
    latency = plot(lambda: write_latency_plot(run_dir, records))
    if latency is not None:
        text += f"\n![seconds per image against steps]({latency.name})\n"
    scored = [(name, result) for _, measured in successful(records)
              for name, result in measured.metrics.items() if result.get("value") is not None]
    if scored:  # the first metric with values is plotted against latency
        name, result = scored[0]
        higher = bool(result.get("higher_is_better", True))
        quality = plot(lambda: write_quality_plot(run_dir, records, name, higher))
        if quality is not None:
            alt = markdown_cell(name).replace("[", "\\[").replace("]", "\\]")
            text += f"\n![{alt} against seconds per image, Pareto front in red]({quality.name})\n"
    try:
        write_text_atomic(run_dir / SUMMARY_FILE, text)
    except OSError as error:
        failed.append(error)
    return failed


def unwritten(run_dir: Path, errors: Sequence[OSError]) -> str:
    """The files of ``errors`` that could not be written, in one line (``cannot write 'summary.md' in 'run': ...``)."""
    names = [os.path.relpath(error.filename, run_dir) if error.filename else "?" for error in errors]
    reason = errors[0].strerror or str(errors[0])
    return f"cannot write {' and '.join(repr(name) for name in names)} in '{run_dir}': {reason}"


def inside_run_folder(run_dir: Path, name: Any) -> bool:
    """Whether a file name from a record stays inside the run folder: relative, no '..', no link leading out.

    Records are plain text anyone can edit; ``harness report`` must neither write nor show a file outside the run.
    """
    if not isinstance(name, str) or not name:
        return False
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:
        return False
    root = Path(run_dir).resolve()
    try:
        return (root / path).resolve().is_relative_to(root)
    except RuntimeError:  # a loop of links
        return False


def grid_names(measured: Measured) -> list[str]:
    """The files ``write_grids`` writes for a record: its grid and its comparison grids (none with
    ``--save_images none``)."""
    return [name for name in (measured.grid, *(comparison.path for comparison in measured.comparisons)) if name]


def prompt_count(config: dict[str, Any]) -> Any:
    """How many prompts a run drew: named in its config, or counted in the prompts older records carry."""
    count = config.get("prompts_count")
    return count if count is not None else len(config.get("prompts", []))


def files_outside(run_dir: Path, measured: Measured) -> list[str]:
    """The files a record names (images it reads, grids it writes) that lie outside the run folder."""
    names = [*measured.images, *grid_names(measured)]
    return [name for name in names if not inside_run_folder(run_dir, name)]


def rebuild(run_dir: Path, on_warning: Callable[[str], None] = lambda _: None) -> list[Record]:
    """Redo ``summary.md`` and every grid of a run folder from its ``records.jsonl`` alone.

    A line that is not a record is skipped with a warning; a file with no record at all is refused, so a
    good ``summary.md`` is never replaced by an empty one. A grid whose images are gone or unreadable, or
    whose files lie outside the run folder, is left as it is and reported through ``on_warning``: the
    summary and the other grids are still worth rebuilding.
    """
    run_dir = Path(run_dir)
    skipped: list[str] = []

    def skip(problem: str) -> None:
        skipped.append(problem)
        on_warning(problem)

    records = read_records(run_dir / RECORDS_FILE, on_skip=skip)
    if not records:
        raise HarnessError(f"'{run_dir / RECORDS_FILE}' holds no record ({len(skipped)} line(s) skipped); "
                           f"{SUMMARY_FILE} and the grids are left as they are. Pass the folder of a finished run.")
    baselines = [record for record, measured in successful_baselines(records) if not files_outside(run_dir, measured)]
    read = 0
    sources = {(run_dir / name).resolve() for _, measured in successful(records) for name in measured.images
               if inside_run_folder(run_dir, name)}
    for record, measured in successful(records):
        outside = files_outside(run_dir, measured)
        if outside:
            on_warning(f"not rebuilding the grids of {record.sampler} ({record.steps} steps): '{outside[0]}' "
                       "lies outside the run folder (an absolute path, '..' or a link out of it).")
            continue
        # A grid written over an image that a record reads would destroy a result of the run.
        overwrites = [name for name in grid_names(measured) if (run_dir / name).resolve() in sources]
        if overwrites:
            on_warning(f"not rebuilding the grids of {record.sampler} ({record.steps} steps): its grid "
                       f"'{overwrites[0]}' is one of the run's images, which a grid must not replace.")
            continue
        if read >= MAX_REPORT_IMAGES:
            on_warning(f"not rebuilding the grids of {record.sampler} ({record.steps} steps): this report has read "
                       f"{read} images, its limit ({MAX_REPORT_IMAGES}); the grid files already there are kept.")
            continue
        try:
            made = write_grids(run_dir, record, baselines)
            read += made.images_read
            for note in made.left_out:
                on_warning(f"the grids of {record.sampler} ({record.steps} steps): {note} (the limit of what a "
                           "record may make harness report read).")
        except (OSError, Image.DecompressionBombError, GridLimitError) as error:
            # A missing, truncated, unidentifiable or oversized image: Pillow raises one of these for each.
            on_warning(f"cannot rebuild the grids of {record.sampler} ({record.steps} steps): "
                       f"{_unreadable(run_dir, error, grid_names(measured))}; the grid files already there are kept.")
    failed = write_summary(run_dir, records)
    if failed:
        raise HarnessError(f"{unwritten(run_dir, failed)}; free some space or make the run folder writable.")
    return records


def _unreadable(run_dir: Path, error: Exception, grids: Sequence[str] = ()) -> str:
    """Which image is missing or unreadable, or which grid cannot be written, named relative to the run folder as
    records name it."""
    if isinstance(error, GridLimitError):
        return str(error)
    name = os.path.relpath(error.filename, run_dir) if isinstance(error, OSError) and error.filename else None
    if name is not None and os.path.normpath(name) in {os.path.normpath(grid) for grid in grids}:
        if isinstance(error, FileNotFoundError):
            return f"cannot write grid '{name}': its folder '{os.path.dirname(name)}' does not exist"
        return f"cannot write grid '{name}': {getattr(error, 'strerror', None) or one_line(error)}"
    if isinstance(error, FileNotFoundError) and name is not None:
        return f"image '{name}' is missing"
    return one_line(error)
