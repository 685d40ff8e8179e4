"""Runs a benchmark, in parts that each do one thing and can be tested alone, each in its own module:

- ``spec``: :class:`BenchOptions` (the command's options) and :class:`BenchSpec` (what the run was asked);
- ``plan`` - :func:`plan` (pure): the run's measurements (:class:`Task`) and their pipeline calls, from the spec;
- ``measure`` - :func:`measure_share`: the timing protocol and the stage profile over one process's share
  of a task's calls;
- ``measure`` - :class:`Scorer`: the quality metrics of a measurement's images, outside the timed region;
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
from harness.benchmark.sampler import GenerationRequest, Sampler, SamplerConfig
from harness.errors import HarnessError, one_line
from harness.models import loading as models
from harness.records import files
from harness.records.environment import PLUGIN_FAILURES, environment, plugin_failure
from harness.records.schema import Comparison, Record
from harness.reporting import report

if TYPE_CHECKING:
    from harness.hooks.registry import Registry

from harness.benchmark.measure import Reference, Scorer, Share, measure_share
from harness.benchmark.plan import Task, comparison_name, file_names, plan
from harness.benchmark.record import RecordContext, RunWriter, build_record
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
        self.reference: Reference | None = None
        self.errors: list[str] = []
        self.unwritten: list[OSError] = []  # summary.md and plots that could not be written
        self.outdir = Path(spec.outdir)
        self.writer = RunWriter(self.outdir)
        # on_warning is looked up at each warning: the CLI sets it after the run is made.
        self.scorer = Scorer(self.metrics, self.model.note if self.model.random_weights else None,
                             lambda message: self.on_warning(message))

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
                config = self.spec.config_dict(self.plan.seed, self.plan.prompts)
                config.update(model=self.model.name, model_location=self.model.location)
                self.context = RecordContext(config, self.environment, self.world.size)
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
        """Every rank times its share of the task's calls; rank 0 writes what they made into one record."""
        requests = self.plan.requests(task)
        distributed.barrier(self.world)  # all ranks start measuring together, so their wall clocks overlap
        share, error = self._guarded(
            lambda: measure_share(sampler, requests, load_s, self.device, self.spec.timing, self.world)
        )
        shares = distributed.gather((share, error), self.world)
        if shares is None:  # not rank 0: it has sent its share
            return
        error = self._first_failure([error for _, error in shares])
        if error is None:
            _, error = self._guarded(lambda: self._record(task, requests, [s for s, _ in shares], info))
        if error is not None:
            self.errors.append(f"{task.sampler} ({task.steps} steps): {error}")
            self.writer.add(self.context.failed(task, error))

    def _record(self, task: Task, requests: list[GenerationRequest], shares: list[Share], info: dict[str, Any]) -> None:
        """Rank 0: the shares' images into the run folder, their figures into one record, metrics, grids."""
        warnings = list(dict.fromkeys(warning for _, warning in sorted(w for share in shares for w in share.warnings)))
        for warning in warnings:
            self.on_warning(warning)
        by_index = {index: image for share in shares for index, image in share.images.items()}
        images = [by_index[index] for index in range(len(by_index))]
        seed_in_names = self.spec.seed
        names = [file_names(task, index, seed_in_names)[0] for index in range(len(images))]
        self.writer.save_images(images, names)
        prompts = [request.prompt for request in requests for _ in request.seeds]
        if task.baseline and self.reference is None:
            self.reference = Reference(f"{task.sampler} {task.steps} steps", images)
        baselines = self.plan.baselines
        comparisons = (
            []
            if task.baseline
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
            file_names(task, 0, seed_in_names)[1],
            list(images[0].size),
            warnings,
            self.scorer.score(task, images, prompts, self.reference),
            comparisons,
        )
        problem = self.writer.add(record)
        if problem is not None:  # the measurement stands; its grids are missing, which the run's exit code says
            self.errors.append(problem)
