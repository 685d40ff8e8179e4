"""The latency plot of a run (``latency.png``): seconds/image against steps, one line per sampler.

Drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so plotting changes
no global matplotlib state (backend, current figure) of the process that calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.records import atomic_path

LATENCY_PLOT = "latency.png"
# A 30-step CFG baseline costs some 30x a 2-step sampler; past this max/min ratio a linear axis
# squashes the few-step lines against the floor, so the seconds go on a log axis.
LOG_SCALE_ABOVE = 10.0


class LatencySeries(NamedTuple):
    sampler: str
    baseline: bool
    points: list[tuple[int, float]]  # (steps, median seconds/image), by steps


def latency_series(records: Sequence[dict[str, Any]]) -> list[LatencySeries]:
    """The successful measurements grouped by sampler, in the run's order of samplers."""
    by_sampler: dict[str, LatencySeries] = {}
    for record in records:
        if record["status"] != "ok":
            continue
        series = by_sampler.setdefault(record["sampler"],
                                       LatencySeries(record["sampler"], bool(record.get("baseline")), []))
        series.points.append((record["steps"], record["timing"]["seconds_per_image"]))
    for series in by_sampler.values():
        series.points.sort()
    return list(by_sampler.values())


def needs_log_scale(seconds: Sequence[float]) -> bool:
    return max(seconds) / min(seconds) > LOG_SCALE_ABOVE


def _title(record: dict[str, Any]) -> str:
    environment = record["environment"]
    width, height = record["image_size"]
    return (f"{record['config']['model']} on {environment.get('device_name')} "
            f"({environment.get('dtype')}), {width}x{height}")


def write_latency_plot(run_dir: Path, records: Sequence[dict[str, Any]]) -> Path | None:
    """Write ``latency.png`` into ``run_dir``; None (and no file) when no measurement succeeded."""
    all_series = latency_series(records)
    if not all_series:
        return None
    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig renders with Agg, whatever the backend
    axes = figure.add_subplot()
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
    axes.set_title(f"Latency: {_title(next(r for r in records if r['status'] == 'ok'))}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path = Path(run_dir) / LATENCY_PLOT
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png")
    return path
