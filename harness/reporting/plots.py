"""The latency plot of a run (``latency.png``): seconds/image against steps, one line per sampler.

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so plotting changes
no global matplotlib state (backend, current figure) of the process that calls it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.records.files import atomic_path
from harness.records.schema import Record, successful

LATENCY_PLOT = "latency.png"
# A 30-step CFG baseline costs some 30x a 2-step sampler; past this max/min ratio a linear axis
# squashes the few-step lines against the floor, so the seconds go on a log axis.
LOG_SCALE_ABOVE = 10.0


class LatencySeries(NamedTuple):
    sampler: str
    baseline: bool
    points: list[tuple[int, float]]  # (steps, median seconds/image), by steps


def latency_series(records: Sequence[Record]) -> list[LatencySeries]:
    """The successful measurements grouped by sampler, in the run's order of samplers."""
    by_sampler: dict[str, LatencySeries] = {}
    for record, measured in successful(records):
        series = by_sampler.setdefault(record.sampler, LatencySeries(record.sampler, record.baseline, []))
        series.points.append((record.steps, measured.timing.seconds_per_image))
    for series in by_sampler.values():
        series.points.sort()
    return list(by_sampler.values())


def needs_log_scale(seconds: Sequence[float]) -> bool:
    return max(seconds) / min(seconds) > LOG_SCALE_ABOVE


def _title(records: Sequence[Record]) -> str:
    """What the run measured on, from its first successful record."""
    record, measured = successful(records)[0]
    environment = record.environment
    width, height = measured.image_size
    return (f"{record.config.get('model')} on {environment.get('device_name')} "
            f"({environment.get('dtype')}), {width}x{height}")


def write_latency_plot(run_dir: Path, records: Sequence[Record]) -> Path | None:
    """Write ``latency.png`` into ``run_dir``; None (and no file) when no measurement succeeded."""
    all_series = latency_series(records)
    if not all_series:
        return None
    figure, axes = _new_figure()
    for series in all_series:
        steps, seconds = zip(*series.points)
        if series.baseline:
            # A baseline runs at one step count: a marker there, and a reference line the few-step
            # samplers can be read against at every step count.
            (marker,) = axes.plot(steps, seconds, marker="s", linestyle="none", label=f"{series.sampler} (baseline)")
            for value in seconds:
                axes.axhline(value, color=marker.get_color(), linestyle="--", linewidth=0.8)
        else:
            axes.plot(steps, seconds, marker="o", label=series.sampler)
    all_seconds = [value for series in all_series for _, value in series.points]
    if needs_log_scale(all_seconds):
        axes.set_yscale("log")
    axes.set_xticks(sorted({step for series in all_series for step, _ in series.points}))
    axes.set_xlabel("inference steps")
    axes.set_ylabel("seconds per image (median)")
    return _finish(figure, axes, f"Latency: {_title(records)}", Path(run_dir) / LATENCY_PLOT)


def _new_figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg, whatever the backend
    return figure, figure.add_subplot()


def _finish(figure: Figure, axes: Axes, title: str, path: Path) -> Path:
    """Title, grid and legend, then the PNG written atomically."""
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    legend = axes.legend()
    for text in (axes.title, axes.xaxis.label, axes.yaxis.label, *axes.texts, *legend.get_texts()):
        # Labels come from records and folder names: '$' must not start mathtext, and a folder name that is not
        # UTF-8 (lone surrogates, '\udcff') is shown escaped, since the font cannot lay them out.
        text.set_parse_math(False)
        text.set_text(text.get_text().encode("utf-8", "backslashreplace").decode("utf-8"))
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path


QUALITY_PLOT = "quality.png"


class QualityPoint(NamedTuple):
    label: str  # "sampler steps"
    seconds: float  # median seconds/image
    quality: float


def quality_points(records: Sequence[Record], metric: str) -> list[QualityPoint]:
    """One point per successful measurement that has a finite value for ``metric`` (a metric's value may be null,
    NaN or infinite, which no axis can show)."""
    points = []
    for record, measured in successful(records):
        value = measured.metrics.get(metric, {}).get("value")
        if value is not None and math.isfinite(value):
            points.append(QualityPoint(f"{record.sampler} {record.steps}", measured.timing.seconds_per_image,
                                       float(value)))
    return points


def pareto_front(points: Sequence[QualityPoint], higher_is_better: bool = True) -> list[QualityPoint]:
    """The points no other point beats on both speed and quality, fastest first."""
    sign = 1 if higher_is_better else -1
    front: list[QualityPoint] = []
    best: float | None = None
    for point in sorted(points, key=lambda p: (p.seconds, -sign * p.quality)):
        if best is None or sign * point.quality > sign * best:
            front.append(point)
            best = point.quality
    return front


def write_quality_plot(run_dir: Path, records: Sequence[Record], metric: str,
                       higher_is_better: bool = True) -> Path | None:
    """Write ``quality.png``: ``metric`` against seconds/image, the Pareto front joined; None without points."""
    points = quality_points(records, metric)
    if not points:
        return None
    figure, axes = _new_figure()
    axes.scatter([p.seconds for p in points], [p.quality for p in points], color="tab:blue", zorder=2)
    for point in points:
        axes.annotate(point.label, (point.seconds, point.quality), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    front = pareto_front(points, higher_is_better)
    axes.plot([p.seconds for p in front], [p.quality for p in front], color="tab:red", linewidth=1.2,
              marker="o", label="Pareto front", zorder=1)
    if needs_log_scale([p.seconds for p in points]):
        axes.set_xscale("log")
    axes.set_xlabel("seconds per image (median)")
    axes.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    return _finish(figure, axes, f"Quality against latency: {_title(records)}", Path(run_dir) / QUALITY_PLOT)


class QualitySeries(NamedTuple):
    """One line of a quality-against-latency plot: a sampler (or LoRA) across step counts."""

    label: str
    baseline: bool
    points: list[tuple[int, float, float]]  # (steps, median seconds/image, quality), by steps


def write_quality_series_plot(path: Path, series: Sequence[QualitySeries], metric: str, higher_is_better: bool,
                              title: str) -> Path | None:
    """Write ``metric`` against seconds/image, one marked line per series with each point's steps written beside it,
    and the Pareto front over every point; None (and no file) without a point."""
    points = [QualityPoint(f"{line.label} {steps}", seconds, quality)
              for line in series for steps, seconds, quality in line.points]
    if not points:
        return None
    figure, axes = _new_figure()
    for line in series:
        if not line.points:
            continue
        _, seconds, quality = zip(*line.points)
        axes.plot(seconds, quality, marker="s" if line.baseline else "o",
                  linestyle="none" if line.baseline else "-",
                  label=f"{line.label} (baseline)" if line.baseline else line.label, zorder=2)
        for steps, x, y in line.points:
            axes.annotate(str(steps), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front(points, higher_is_better)
    axes.plot([p.seconds for p in front], [p.quality for p in front], color="tab:red", linewidth=4, alpha=0.3,
              label="Pareto front", zorder=1)
    if needs_log_scale([p.seconds for p in points]):
        axes.set_xscale("log")
    axes.set_xlabel("seconds per image (median); numbers: steps")
    axes.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    return _finish(figure, axes, title, Path(path))
