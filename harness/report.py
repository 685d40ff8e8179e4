"""Markdown tables and image grids, made from records alone (so ``harness report`` can redo them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont
from tabulate import tabulate

from harness.records import RECORDS_FILE, SUMMARY_FILE, read_records, save_image_atomic, write_text_atomic

# Tiles smaller than this are scaled up (nearest neighbour) so grids of tiny images stay readable.
MIN_TILE = 128
LABEL_HEIGHT = 22
GAP = 4


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f}"


NOISY_STDEV = 0.05  # a stdev above 5% of the median makes a comparison untrustworthy


def _baseline(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in records if r.get("baseline") and r["status"] == "ok"), None)


def ideal_speedup(record: dict[str, Any], baseline: dict[str, Any]) -> float:
    """The speedup over the baseline if only the number of UNet evaluations changed.

    Takes the baseline's instrumented call, keeps its text encoding, decoding and other fixed costs,
    and scales its denoising time by the ratio of UNet evaluations (batch sizes summed).
    """
    stages = baseline["stages"]
    fixed = stages["total_s"] - stages["denoise_s"]
    ratio = record["unet"]["evaluations"] / baseline["unet"]["evaluations"]
    return stages["total_s"] / (fixed + stages["denoise_s"] * ratio)


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """The run's timing table in GitHub markdown; few-step rows show their speedup over the baseline."""
    baseline = _baseline(records)
    rows = []
    for record in records:
        if record["status"] != "ok":
            rows.append([record["sampler"], record["steps"], record["guidance_scale"], "", "failed: " + record["error"]])
            continue
        timing = record["timing"]
        per_image = timing["seconds_per_image"]
        stats = timing["seconds_per_call"]
        spread = stats["stdev"] / stats["median"]
        speedup = ideal = ""
        if baseline is not None and not record.get("baseline") and baseline["unet"]["evaluations"]:
            speedup = f"{baseline['timing']['seconds_per_image'] / per_image:.2f}x"
            ideal = f"{ideal_speedup(record, baseline):.2f}x"
        rows.append([
            record["sampler"],
            record["steps"],
            record["guidance_scale"],
            record["unet"]["evaluations_per_image"],
            _ms(per_image),
            f"{timing['images_per_s']:.2f}",
            f"{spread:.1%}" + (" !" if spread > NOISY_STDEV else ""),
            _ms(stats["p90"] / timing["images_per_call"]),
            _ms(timing["first_call_s"]),
            f"{timing['load_s']:.2f}",
            _memory(record["memory"]),
            speedup,
            ideal,
        ])
    headers = ["sampler", "steps", "guidance", "UNet evals/image", "ms/image", "images/s", "stdev",
               "p90 ms/image", "first call ms", "load s", "peak MB", "speedup", "ideal speedup"]
    if _processes(records) > 1:  # one process's images/s is its own; several add up
        headers.append("aggregate images/s")
        for row, record in zip(rows, records):
            if record["status"] == "ok":
                row.append(_rate(record["timing"].get("aggregate_images_per_s")))
    metric_names = list(dict.fromkeys(name for r in records if r["status"] == "ok" for name in r.get("metrics", {})))
    for row, record in zip(rows, records):
        if record["status"] == "ok":
            row += [_metric_cell(record["metrics"].get(name, {})) for name in metric_names]
    return tabulate(rows, headers=headers + metric_names, tablefmt="github")


def _processes(records: Sequence[dict[str, Any]]) -> int:
    return max((r.get("world_size", 1) for r in records if r["status"] == "ok"), default=1)


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _metric_cell(result: dict[str, Any]) -> str:
    if "value" not in result:
        return "error" if "error" in result else ""
    return f"{result['value']:.4g}"


def stage_table(records: Sequence[dict[str, Any]]) -> str:
    """Where the time of one instrumented call goes, stage by stage."""
    rows = []
    for record in records:
        if record["status"] != "ok":
            continue
        stages = record["stages"]
        steps = stages["per_step_s"]
        other = stages["total_s"] - stages["text_encode_s"] - stages["denoise_s"] - stages["decode_s"]
        rows.append([record["sampler"], record["steps"], _ms(stages["text_encode_s"]), _ms(stages["denoise_s"]),
                     _ms(sum(steps) / len(steps)) if steps else "", _ms(stages["decode_s"]), _ms(other),
                     _ms(stages["total_s"])])
    headers = ["sampler", "steps", "text encode ms", "denoise ms", "ms/step", "VAE decode ms", "other ms", "total ms"]
    return tabulate(rows, headers=headers, tablefmt="github")


def _memory(memory: dict[str, float]) -> str:
    value = memory.get("cuda_max_allocated_mb", memory.get("peak_rss_mb"))
    return "" if value is None else f"{value:.0f}"


def summary_markdown(records: Sequence[dict[str, Any]]) -> str:
    if not records:
        return "# harness bench\n\nNo measurements.\n"
    first = next((r for r in records if r["status"] == "ok"), records[0])
    config = first["config"]
    env = first.get("environment", {})
    width, height = first.get("image_size", ("?", "?"))
    lines = [
        "# harness bench",
        "",
        f"- model: `{config['model']}`; device: {env.get('device_name', '')} ({env.get('device', '')}, "
        f"{env.get('dtype', '')}); images {width}x{height}",
        f"- {len(config['prompts'])} prompt(s) x {config['num_images']} image(s) per call; seed {config['seed']}; "
        f"{config['warmup']} warmup call(s), {config['repeats']} measured pass(es)",
        "- ms/image: median call / images per call, each call bracketed by a device synchronize; stdev in % of "
        "the median; speedup: baseline ms/image / this ms/image; ideal speedup: the baseline's own stage "
        "times with only the UNet evaluations scaled",
    ]
    processes = _processes(records)
    if processes > 1:
        lines.append(f"- {processes} processes, each timing its share of the calls: ms/image, stdev and p90 over "
                     "the calls of every rank, load and first call the median over ranks, peak memory the largest "
                     "rank's; aggregate images/s: every measured image of every rank over the wall clock from the "
                     "first rank's first measured call to the last rank's last")
    lines += [
        "",
        summary_table(records),
        "",
    ]
    if any(r["status"] == "ok" and r["timing"]["seconds_per_call"]["stdev"]
           > NOISY_STDEV * r["timing"]["seconds_per_call"]["median"] for r in records):
        lines += ["! stdev above 5% of the median: too noisy to compare; rerun with more --repeats or on a "
                  "quieter machine.", ""]
    if any(r["status"] == "ok" for r in records):
        lines += ["## Stages (one extra instrumented call, synchronized at each stage boundary)", "",
                  stage_table(records), ""]
    return "\n".join(lines)


def write_summary(run_dir: Path, records: Sequence[dict[str, Any]]) -> str:
    """Write the latency plot and ``summary.md`` (which links the plot)."""
    from harness.plots import write_latency_plot, write_quality_plot

    text = summary_markdown(records)
    plot = write_latency_plot(Path(run_dir), records)
    if plot is not None:
        text += f"\n![seconds per image against steps]({plot.name})\n"
    scored = [(name, result) for r in records if r["status"] == "ok"
              for name, result in r.get("metrics", {}).items() if "value" in result]
    if scored:  # the first metric with values is plotted against latency
        name, result = scored[0]
        quality = write_quality_plot(Path(run_dir), records, name, result.get("higher_is_better", True))
        text += f"\n![{name} against seconds per image, Pareto front in red]({quality.name})\n"
    write_text_atomic(Path(run_dir) / SUMMARY_FILE, text)
    return text


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _tile_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    width, height = images[0].size
    scale = max(1, math.ceil(MIN_TILE / min(width, height)))
    return width * scale, height * scale


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """All images in a near-square grid, in order, row by row."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    tile_w, tile_h = _tile_size(images)
    grid = Image.new("RGB", (columns * tile_w + (columns - 1) * GAP, rows * tile_h + (rows - 1) * GAP), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST),
                   (column * (tile_w + GAP), row * (tile_h + GAP)))
    return grid


def comparison_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]]) -> Image.Image:
    """One labelled row per (label, images): the seed's baseline-on-top, few-step-below comparison."""
    all_images = [image for _, images in rows for image in images]
    tile_w, tile_h = _tile_size(all_images)
    columns = max(len(images) for _, images in rows)
    font = _font()
    width = max(columns * tile_w + (columns - 1) * GAP, 320)
    canvas = Image.new("RGB", (width, len(rows) * (LABEL_HEIGHT + tile_h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, images in rows:
        draw.text((4, y + 3), label, fill="black", font=font)
        y += LABEL_HEIGHT
        for column, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (column * (tile_w + GAP), y))
        y += tile_h + GAP
    return canvas


def row_label(record: dict[str, Any]) -> str:
    seconds = record["timing"]["seconds_per_image"]
    return f"{record['sampler']} | {record['steps']} steps | cfg {record['guidance_scale']:g} | {seconds:.3f} s/image"


def write_grids(run_dir: Path, record: dict[str, Any], baselines: Sequence[dict[str, Any]]) -> None:
    """Write the record's grid and its comparison grids against each baseline record."""
    run_dir = Path(run_dir)
    images = [Image.open(run_dir / name) for name in record["images"]]
    save_image_atomic(image_grid(images), run_dir / record["grid"])
    for comparison in record.get("comparisons", []):
        baseline = next(
            (b for b in baselines
             if b["sampler"] == comparison["baseline_sampler"] and b["steps"] == comparison["baseline_steps"]),
            None,
        )
        if baseline is None:
            continue
        top = [Image.open(run_dir / name) for name in baseline["images"]]
        grid = comparison_grid([(row_label(baseline), top), (row_label(record), images)])
        save_image_atomic(grid, run_dir / comparison["path"])


def rebuild(run_dir: Path) -> list[dict[str, Any]]:
    """Redo ``summary.md`` and every grid of a run folder from its ``records.jsonl`` alone."""
    records = read_records(Path(run_dir) / RECORDS_FILE)
    ok = [r for r in records if r["status"] == "ok"]
    baselines = [r for r in ok if r.get("baseline")]
    for record in ok:
        write_grids(run_dir, record, baselines)
    write_summary(run_dir, records)
    return records
