"""A measurement's typed record (:func:`build_record`, pure) and every file of the run folder (:class:`RunWriter`)."""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.records import files
from harness.records import store as records
from harness.records.schema import Comparison, Measured, Memory, RankFigures, Record, Timing, UnetCounts
from harness.records.stats import Stats
from harness.reporting import grids, report

if TYPE_CHECKING:
    pass

from harness.benchmark.measure import Share
from harness.benchmark.plan import Task


@dataclass(frozen=True)
class RecordContext:
    """What every record of a run shares: its configuration, environment and number of processes."""

    config: dict[str, Any]
    environment: dict[str, Any]
    world_size: int

    def record(self, task: Task, *, error: str | None = None, measured: Measured | None = None) -> Record:
        """A record of ``task`` with the run's shared part: failed with ``error``, or with ``measured`` figures."""
        return Record(
            sampler=task.sampler,
            baseline=task.baseline,
            steps=task.steps,
            guidance_scale=task.guidance_scale,
            created_utc=records.utc_now(),
            config=self.config_of(task.sampler),
            environment=self.environment,
            world_size=self.world_size,
            error=error,
            measured=measured,
        )

    def config_of(self, sampler: str) -> dict[str, Any]:
        """The run's configuration as a record of ``sampler`` carries it: its own sampler's options only."""
        by_sampler = self.config.get("sampler_options", {})
        return {**self.config, "sampler_options": {name: options for name, options in by_sampler.items()
                                                   if name == sampler}}

    def failed(self, task: Task, error: str) -> Record:
        return self.record(task, error=error)


def build_record(
    context: RecordContext,
    task: Task,
    shares: Sequence[Share],
    info: dict[str, Any],
    image_names: list[str],
    grid: str,
    image_size: list[int],
    warnings: list[str],
    metrics: dict[str, dict[str, Any]],
    comparisons: list[Comparison],
) -> Record:
    """The record of a measurement from every rank's share (pure: no file, no clock but the creation time)."""
    made = sum(share.image_count for share in shares)
    per_call = made // sum(share.calls for share in shares)
    samples = [s for share in shares for s in share.measurement.samples]
    stats = Stats.from_samples(samples)
    per_image = stats.median / per_call
    # All ranks together: every measured image over the wall clock from the first start to the last finish.
    measured_images = len(samples) * per_call
    wall_s = max(share.measurement.finished for share in shares) - min(share.measurement.started for share in shares)
    profile = shares[0].profile
    evaluations = sum(profile.unet_batch_sizes)
    measured = Measured(
        sampler_info=info,
        timing=Timing(
            load_s=statistics.median(share.load_s for share in shares),
            first_call_s=statistics.median(share.measurement.first_call_s for share in shares),
            seconds_per_call=stats,
            samples_s=samples,
            images_per_call=per_call,
            seconds_per_image=per_image,
            images_per_s=1.0 / per_image,
            aggregate_images_per_s=measured_images / wall_s if wall_s > 0 else None,
        ),
        unet=UnetCounts(
            calls=profile.unet_calls,
            batch_sizes=sorted(set(profile.unet_batch_sizes)),
            evaluations=evaluations,
            evaluations_per_image=evaluations / per_call,
        ),
        stages=profile,
        memory=Memory.largest([Memory(**share.measurement.memory) for share in shares]),
        deterministic=all(share.deterministic for share in shares),
        image_size=image_size,
        images=image_names,
        grid=grid,
        warnings=warnings,
        metrics=metrics,
        comparisons=comparisons,
        ranks=[
            RankFigures(
                rank=share.rank,
                host=share.host,
                device=share.device,
                calls=share.calls,
                load_s=share.load_s,
                first_call_s=share.measurement.first_call_s,
                seconds_per_image=share.measurement.stats.median / per_call,
                measured_s=share.measurement.finished - share.measurement.started,
                memory=Memory(**share.measurement.memory),
            )
            for share in shares
        ],
        images_made=made,
    )
    return context.record(task, measured=measured)


class RunWriter:
    """Every file of a run folder: images, grids, ``records.jsonl`` (appended whole, one record at a time),
    ``summary.md`` and the plots. Only rank 0 has one."""

    def __init__(self, outdir: Path):
        self.outdir = Path(outdir)
        self.records: list[Record] = []

    @property
    def records_path(self) -> Path:
        return self.outdir / records.RECORDS_FILE

    def make_folders(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            (self.outdir / task.folder).mkdir(parents=True, exist_ok=True)

    def write_prompts(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The run's prompts file; the config fields that name it."""
        return records.write_prompts(self.outdir, prompts)

    def save_images(self, images: Sequence[Any], names: Sequence[str]) -> None:
        for image, name in zip(images, names):
            files.save_image_atomic(image, self.outdir / name)

    def add(self, record: Record) -> str | None:
        """Write the record's grids, then append it to ``records.jsonl``; return why a grid was not written, if so.

        A grid that cannot be written does not undo a finished measurement: the record is appended all the same,
        with that line among its warnings. A full disk still stops the run, once the record is in.
        """
        problem, stop = None, None
        if record.measured is not None:
            try:
                grids.write_grids(self.outdir, record, [r for r in self.records if r.baseline and r.ok])
            except OSError as error:
                name = os.path.relpath(error.filename, self.outdir) if error.filename else record.measured.grid
                problem = (f"the grids of {record.sampler} ({record.steps} steps) were not written: '{name}': "
                           f"{error.strerror or error}; the measurement is kept, and `harness report {self.outdir}` "
                           "writes its grids once that is fixed.")
                measured = dataclasses.replace(record.measured, warnings=[*record.measured.warnings, problem])
                record = dataclasses.replace(record, measured=measured)
                stop = error if error.errno in files.DISK_ERRORS else None
        records.append_record(self.records_path, record)
        self.records.append(record)
        if stop is not None:
            raise stop
        return problem

    def write_summary(self) -> list[OSError]:
        """Write ``summary.md`` and the plots; return the errors of those that could not be written."""
        return report.write_summary(self.outdir, self.records)
