"""Runs a benchmark, in parts that each do one thing and can be tested alone, each in its own module:

- ``spec``: :class:`BenchOptions` (the command's options) and :class:`BenchSpec` (what the run was asked);
- ``plan`` - :func:`plan` (pure): the run's measurements (:class:`Task`) and their pipeline calls, from the spec;
- ``measure`` - :func:`measure_share`: the timing protocol and the stage profile over one process's share
  of a task's calls, handing its images on in batches as they are made;
- ``measure`` - :class:`Scoring`: the quality metrics, updated batch by batch in every process, merged and
  computed on rank 0;
- ``references``: the reference sets of set metrics (``--reference``, ``--reference_stats``) and
  ``--save_stats``;
- ``record`` - :func:`build_record` (pure): the typed record of a measurement from what every process measured;
- ``record`` - :class:`RunWriter`: every file of the run folder (images, grids, records, summary, plots);
- here, :class:`BenchRun`: loads each sampler once and moves tasks through these parts, with the other processes
  of a torchrun / accelerate launch job (``harness.benchmark.distributed``) where there are several.
"""

from __future__ import annotations

import dataclasses
import gc
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.benchmark import distributed, resources, timing
from harness.benchmark.metric import MetricConfig
from harness.benchmark.sampler import Sampler, SamplerConfig
from harness.errors import HarnessError, one_line
from harness.models import loading as models
from harness.records import files
from harness.records.environment import PLUGIN_FAILURES, environment, plugin_failure
from harness.records.schema import Comparison, Record
from harness.reporting import report

if TYPE_CHECKING:
    from harness.hooks.registry import Registry

from harness.benchmark.measure import Scoring, Share, measure_share
from harness.benchmark.metric import MetricInput
from harness.benchmark.plan import Task, comparison_name, file_names, plan
from harness.benchmark.record import RecordContext, RunWriter, build_record
from harness.benchmark.references import ReferenceSets
from harness.benchmark.spec import BenchSpec

# Errors that mean the output disk cannot take more data; the run stops instead of failing every measurement.
DISK_ERRORS = files.DISK_ERRORS



class BenchRun:
    """One ``harness bench`` invocation; records are appended to ``records.jsonl`` as they finish.

    With several processes (``world``) every rank loads each sampler once and measures its share of every
    task's pipeline calls; rank 0 gathers the shares, writes every file and holds the records.
    """

    def __init__(
        self,
        spec: BenchSpec,
        registry: Registry,
        on_progress: Callable[[Task], None] = lambda _: None,
        world: distributed.World = distributed.SINGLE_PROCESS,
    ):
        self.spec = spec
        self.registry = registry
        self.on_progress = on_progress
        self.on_warning: Callable[[str], None] = lambda _: None
        self.on_loaded: Callable[[], None] = lambda: None  # after each sampler loaded in every process
        self.world = world
        resources.check_device(spec.device)
        self.device = distributed.local_device(models.resolve_device(spec.device), world)
        self.dtype = models.resolve_dtype(spec.dtype, self.device)
        self.model = models.resolve_model(spec.model)
        # Without --seed, draw one so the run is still reproducible from its records (rank 0's, see run()).
        seed = spec.seed if spec.seed is not None else random.randrange(2**31)
        self.plan = plan(spec, registry, self.model.default_prompt, seed)
        calls = self.plan.calls_per_task
        if world.size > calls:
            prompts = len(self.plan.prompts)
            raise HarnessError(
                f"{world.size} processes share {calls} pipeline call(s) per measurement "
                f"({prompts} prompt(s) x {calls // prompts} call(s) each); launch at most that many "
                "processes, or give more prompts with --prompts."
            )
        # Each sampler's cheap checks (a LoRA preset missing from the offline cache, a step count it has no weights
        # for) before the run folder exists: a run that cannot start leaves nothing behind.
        for name in dict.fromkeys(task.sampler for task in self.plan.tasks):
            steps = [task.steps for task in self.plan.tasks if task.sampler == name]
            registry.sampler(name).cls(self.sampler_config(), spec.sampler_options.get(name)).preflight(steps)
        guided = any(task.guidance_scale > 1 for task in self.plan.tasks)  # diffusers' test for guidance
        resources.refuse_what_cannot_fit(self.model, self.device, self.dtype, spec.speed, spec.height, spec.width,
                                         self.plan.images_per_call, guided)
        self.metrics = {
            name: registry.metric(name).cls(MetricConfig(self.device), spec.metric_options.get(name))
            for name in spec.metrics
        }
        # Here, not when the run starts: a plugin whose machine-info hook fails stops the run before its folder exists.
        self.environment = environment(self.device, self.dtype, registry.pm) if world.is_main else {}
        self.errors: list[str] = []
        self.unwritten: list[OSError] = []  # summary.md and plots that could not be written
        self.outdir = Path(spec.outdir)
        self.writer = RunWriter(self.outdir)
        # Checked here, before the run folder exists; read (rank 0 only) when the run starts. The pictures' size
        # (model configs read from disk) matters only to a --reference folder.
        size = resources.image_size(self.model, spec.height, spec.width) if spec.reference is not None else None
        self.references = ReferenceSets(spec, self.metrics, size)
        # on_warning is looked up at each warning: the CLI sets it after the run is made.
        self.scoring = Scoring(self.metrics, self.model.note if self.model.random_weights else None,
                               lambda message: self.on_warning(message), self.references.label)

    def sampler_config(self) -> SamplerConfig:
        spec = self.spec
        return SamplerConfig(self.model, self.device, self.dtype, spec.lora_path, spec.lora_id, spec.speed)

    @property
    def tasks(self) -> tuple[Task, ...]:
        return self.plan.tasks

    @property
    def records(self) -> list[Record]:
        return self.writer.records

    @property
    def records_path(self) -> Path:
        return self.writer.records_path

    def baseline_files(self) -> list[Path]:
        """Every image and grid the baselines will write: another run's records may describe the ones there."""
        images = len(self.plan.prompts) * self.plan.num_images
        names = (name for task in self.plan.baselines for index in range(images)
                 for name in file_names(task, index, self.spec.seed))
        return [self.outdir / name for name in dict.fromkeys(names)]

    def run(self) -> list[Record]:
        # Every rank must draw its images from the same seeds: rank 0's seed is the run's.
        self.plan = dataclasses.replace(self.plan, seed=distributed.all_gather(self.plan.seed, self.world)[0])
        main = self.world.is_main
        try:
            if main:
                self.writer.make_folders(self.tasks)
                config = self.spec.config_dict(self.plan.seed, self.writer.write_prompts(self.plan.prompts))
                config.update(model=self.model.name, model_location=self.model.location)
                self.context = RecordContext(config, self.environment, self.world.size)
                if self.scoring.random_weights_note is None:
                    self.scoring.broken = self.references.read(self.metrics)
                    for name, message in self.scoring.broken.items():
                        self.on_warning(f"metric {name}: {message}")
            # Every rank learns which metrics cannot score, so none spends time on them.
            self.scoring.broken = distributed.all_gather(self.scoring.broken, self.world)[0]
            for name in dict.fromkeys(task.sampler for task in self.tasks):
                self._run_sampler(name, [task for task in self.tasks if task.sampler == name])
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            raise HarnessError(
                f"cannot write results to '{self.outdir}': {error.strerror}; free some space or pass --outdir on "
                f"another disk. The {len(self.records)} finished measurement(s) are in {self.records_path}."
            ) from None
        except distributed.ProcessLost as error:
            if main:
                error.message += f". The {len(self.records)} finished measurement(s) are in {self.records_path}."
            raise
        finally:
            self.scoring.close()
            if main:
                # The records are the source of truth: `harness report` rebuilds these from them once there is room.
                self.unwritten = self.writer.write_summary()
                if self.unwritten:
                    self.errors.append(f"{report.unwritten(self.outdir, self.unwritten)}; free some space or make "
                                       f"the folder writable, then `harness report {self.outdir}` writes them from "
                                       f"{self.records_path.name}.")
        return self.records

    def _run_sampler(self, name: str, tasks: list[Task]) -> None:
        cls = self.registry.sampler(name).cls
        sampler = cls(self.sampler_config(), self.spec.sampler_options.get(name))
        try:
            try:
                _, load_s = timing.timed(sampler.load, self.device)
                load_error = None
            except PLUGIN_FAILURES as error:  # a failing plugin must not stop the others, nor end harness
                load_s, load_error = 0.0, plugin_failure(error)
            # Every rank learns whether all of them loaded: they measure this sampler together or not at all.
            load_error = self._first_failure(distributed.all_gather(load_error, self.world))
            if load_error is None:
                self.on_loaded()
            else:
                self.errors.append(f"{name}: {load_error}")
                for task in tasks:
                    if self.world.is_main:
                        self.writer.add(self.context.failed(task, load_error))
                    self.on_progress(task)
                return
            info = dataclasses.asdict(sampler.describe())
            for task in tasks:
                self._measure(sampler, task, load_s, info)
                self.on_progress(task)
        finally:
            sampler.unload()  # whatever it loaded, even before failing, must not crowd the next sampler

    def _guarded(self, step: Callable[[], Any]) -> tuple[Any, str | None]:
        """``step()``'s result, or its failure as one line; only the disk filling up stops the run."""
        try:
            return step(), None
        except torch.cuda.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()  # the next step count starts from a clean cache
            return None, "CUDA out of memory: reduce --num_images (or --batch) to 1 and close other GPU applications."
        except OSError as error:
            if error.errno in DISK_ERRORS:
                raise  # nothing more can be written: stop the run
            return None, one_line(error)
        except PLUGIN_FAILURES as error:  # a failing plugin must not stop the others, nor end harness
            return None, plugin_failure(error)

    def _first_failure(self, errors: list[str | None]) -> str | None:
        """The first failed rank's error, naming the rank when there are several."""
        return next((self.world.label(rank) + error for rank, error in enumerate(errors) if error is not None), None)

    def _measure(self, sampler: Sampler, task: Task, load_s: float, info: dict[str, Any]) -> None:
        """Every rank times its share of the task's calls, its images streaming through the metrics (and into the
        run folder, as --save_images says) as they are made; rank 0 writes what they measured into one record."""
        requests = self.plan.requests(task)
        baselines = self.plan.baselines
        self.scoring.start(task, first_baseline=bool(baselines) and task == baselines[0],
                           run_has_baseline=bool(baselines))
        kept: dict[int, Any] = {}  # another rank's images to save, sent to rank 0
        written: list[str] = []  # rank 0's, written as they are made
        saved = self.spec.images_saved(len(requests) * self.plan.images_per_call)
        sizes: list[list[int]] = []

        def consume(batch: MetricInput) -> None:
            sizes[:] = sizes or [list(batch.images[0].size)]
            self.scoring.update(batch, task)
            for index, image in zip(batch.positions, batch.images):
                if index < saved:
                    if self.world.is_main:
                        written.append(file_names(task, index, self.spec.seed)[0])
                        self.writer.save_images([image], written[-1:])
                    else:
                        kept[index] = image

        distributed.barrier(self.world)  # all ranks start measuring together, so their wall clocks overlap
        share, error = self._guarded(
            lambda: measure_share(sampler, requests, load_s, self.device, self.spec.timing, self.world, consume)
        )
        if share is not None:
            share.images, share.metric_states = kept, self.scoring.states()
        shares = distributed.gather((share, error), self.world)
        if shares is None:  # not rank 0: it has sent its share
            return
        error = self._first_failure([error for _, error in shares])
        if error is None:
            _, error = self._guarded(lambda: self._record(task, [s for s, _ in shares], info, saved, sizes[0]))
        if error is None:
            self.scoring.commit_reference(task)
            return
        for name in written:  # a failed measurement names no picture: the ones it wrote go
            (self.outdir / name).unlink(missing_ok=True)
        self.errors.append(f"{task.sampler} ({task.steps} steps): {error}")
        self.writer.add(self.context.failed(task, error))

    def _record(self, task: Task, shares: list[Share], info: dict[str, Any], saved: int,
                image_size: list[int]) -> None:
        """Rank 0: the other ranks' kept images into the run folder, the metrics merged, one record, its grids."""
        warnings = list(dict.fromkeys(warning for _, warning in sorted(w for share in shares for w in share.warnings)))
        for warning in warnings:
            self.on_warning(warning)
        seed_in_names = self.spec.seed
        for share in shares[1:]:
            for index, image in sorted(share.images.items()):
                self.writer.save_images([image], [file_names(task, index, seed_in_names)[0]])
            share.images = {}
        made = sum(share.image_count for share in shares)
        names = [file_names(task, index, seed_in_names)[0] for index in range(min(saved, made))]
        metrics = self.scoring.finish(task, [share.metric_states for share in shares[1:]], succeeded=True)
        if self.spec.save_stats is not None:
            for unwritten in self.references.save_stats(self.scoring.active, metrics, task):
                self.on_warning(unwritten)
        baselines = self.plan.baselines
        comparisons = (
            []
            if task.baseline or not names
            else [
                Comparison(b.sampler, b.steps, comparison_name(task, b, len(baselines), seed_in_names))
                for b in baselines
            ]
        )
        record = build_record(
            self.context,
            task,
            shares,
            info,
            names,
            file_names(task, 0, seed_in_names)[1] if names else "",
            image_size,
            warnings,
            metrics,
            comparisons,
        )
        problem = self.writer.add(record)
        if problem is not None:  # the measurement stands; its grids are missing, which the run's exit code says
            self.errors.append(problem)
