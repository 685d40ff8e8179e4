"""Runs a benchmark: each sampler is loaded once, measured at each step count by ``harness.timing``,
and its images, grids and records are written as soon as that measurement ends."""

from __future__ import annotations

import errno
import gc
import hashlib
import platform
import random
import statistics
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from harness import distributed, models, records, report, timing
from harness.errors import HarnessError, one_line
from harness.metric import MetricConfig, MetricInput
from harness.plugins import Registry
from harness.sampler import GenerationRequest, Sampler, SamplerConfig
from harness.speed import SpeedOptions


# Errors that mean the output disk cannot take more data; the run stops instead of failing every measurement.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@dataclass
class BenchSpec:
    """Everything ``harness bench`` was asked to do, after option parsing."""

    samplers: list[str]
    steps: list[int]
    prompts: list[str]
    model: str
    outdir: Path
    num_images: int = 1
    seed: int | None = None
    baseline_steps: int = 30
    baseline_guidance: float = 7.5
    baseline_outdir: Path | None = None
    lora_path: str | None = None
    lora_id: str | None = None
    device: str | None = None
    dtype: str | None = None
    height: int | None = None
    width: int | None = None
    timing: timing.TimingSettings = field(default_factory=timing.TimingSettings)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    batch: int | None = None  # images per pipeline call; None: all --num_images in one call
    sampler_options: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_options: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_call(self) -> int:
        return self.batch or self.num_images

    def config_dict(self, seed: int) -> dict[str, Any]:
        config = asdict(self)
        config.update(config.pop("timing"))
        config.update(seed=seed, outdir=str(self.outdir),
                      baseline_outdir=str(self.baseline_outdir) if self.baseline_outdir else None)
        return config


@dataclass
class Task:
    """One (sampler, steps) measurement and where its files go, relative to the run folder."""

    sampler: str
    steps: int
    guidance_scale: float
    baseline: bool
    folder: str  # "" for the run folder itself


def seed_suffix(seed: int | None) -> str:
    return "" if seed is None else f"_seed{seed}"


def plan(spec: BenchSpec, registry: Registry) -> list[Task]:
    """Baselines first, so each few-step measurement can be compared with them as soon as it ends."""
    classes = {name: registry.sampler(name).cls for name in spec.samplers}
    baselines = [n for n in spec.samplers if classes[n].is_baseline]
    few_step = [n for n in spec.samplers if not classes[n].is_baseline]
    baseline_root = _baseline_folder(spec)
    tasks = []
    for name in baselines:
        folder = baseline_root if len(baselines) == 1 else f"{baseline_root}/{name}"
        tasks.append(Task(name, spec.baseline_steps, spec.baseline_guidance, True, folder))
    for name in few_step:
        folder = "" if len(few_step) == 1 else name
        tasks += [Task(name, steps, classes[name].default_guidance, False, folder) for steps in spec.steps]
    return tasks


def _baseline_folder(spec: BenchSpec) -> str:
    if spec.baseline_outdir is None:
        return "baseline"
    return _relative_or_absolute(spec.baseline_outdir, spec.outdir)


def _relative_or_absolute(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def file_names(task: Task, index: int, seed: int | None) -> tuple[str, str]:
    """The seed's names: (image ``index``, the task's grid), relative to the run folder."""
    prefix = "baseline" if task.baseline else "image"
    grid = f"grid_baseline_s{task.steps}" if task.baseline else f"grid_s{task.steps}"
    folder = f"{task.folder}/" if task.folder else ""
    suffix = seed_suffix(seed)
    return f"{folder}{prefix}_s{task.steps}_i{index}{suffix}.png", f"{folder}{grid}{suffix}.png"


def comparison_name(task: Task, baseline: Task, seed: int | None) -> str:
    folder = f"{task.folder}/" if task.folder else ""
    return f"{folder}compare_baseline{baseline.steps}_flash{task.steps}{seed_suffix(seed)}.png"


@dataclass
class Share:
    """What one rank measured of one task: its images, keyed by their index in the whole task, and its timing."""

    rank: int
    host: str
    device: str
    calls: int
    load_s: float
    images: dict[int, Any]  # index -> PIL image of the last measured pass
    warnings: list[tuple[int, str]]  # (call index, warning) from the sampler's check of each call
    deterministic: bool
    measurement: timing.Measurement  # without its outputs: the images above are what travels
    profile: timing.Profile


class BenchRun:
    """One ``harness bench`` invocation; records are appended to ``records.jsonl`` as they finish.

    With several processes (``world``) every rank loads each sampler once and measures its share of every
    task's pipeline calls; rank 0 gathers the shares, writes every file and holds the records.
    """

    def __init__(self, spec: BenchSpec, registry: Registry, on_progress: Callable[[Task], None] = lambda _: None,
                 world: distributed.World = distributed.World()):
        self.spec = spec
        self.registry = registry
        self.on_progress = on_progress
        self.on_warning: Callable[[str], None] = lambda _: None
        self.world = world
        self.device = distributed.local_device(models.resolve_device(spec.device), world)
        self.dtype = models.resolve_dtype(spec.dtype, self.device)
        self.model = models.resolve_model(spec.model)
        if not spec.prompts:
            spec.prompts = [self.model.default_prompt]
        self.tasks = plan(spec, registry)
        calls = len(spec.prompts) * (spec.num_images // spec.images_per_call)
        if world.size > calls:
            raise HarnessError(f"{world.size} processes share {calls} pipeline call(s) per measurement "
                               f"({len(spec.prompts)} prompt(s) x {calls // len(spec.prompts)} call(s) each); launch "
                               "at most that many processes, or give more prompts with --prompts.")
        # Without --seed, draw one so the run is still reproducible from its records (rank 0's, see run()).
        self.seed = spec.seed if spec.seed is not None else random.randrange(2**31)
        self.records: list[dict[str, Any]] = []
        metric_config = MetricConfig(self.device, dict(spec.metric_options))
        self.metrics = {name: registry.metric(name).cls(metric_config) for name in spec.metrics}
        self.reference: tuple[str, list] | None = None  # the first baseline's label and images
        self.errors: list[str] = []
        self.outdir = Path(spec.outdir)

    @property
    def records_path(self) -> Path:
        return self.outdir / records.RECORDS_FILE

    def run(self) -> list[dict[str, Any]]:
        # Every rank must draw its images from the same seeds: rank 0's seed is the run's.
        self.seed = distributed.all_gather(self.seed, self.world)[0]
        main = self.world.is_main
        try:
            if main:
                for task in self.tasks:
                    (self.outdir / task.folder).mkdir(parents=True, exist_ok=True)
                self.environment = records.environment(self.device, self.dtype, self.registry.pm)
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
                try:
                    report.write_summary(self.outdir, self.records)
                except OSError:
                    pass  # the records are the source of truth: `harness report` rebuilds the summary from them
        return self.records

    def _run_sampler(self, name: str, tasks: list[Task]) -> None:
        cls = self.registry.sampler(name).cls
        config = SamplerConfig(self.model, self.device, self.dtype, self.spec.lora_path, self.spec.lora_id,
                               dict(self.spec.sampler_options), self.spec.speed)
        sampler: Sampler = cls(config)
        try:
            try:
                _, load_s = timing.timed(sampler.load, self.device)
                load_error = None
            except Exception as error:  # noqa: BLE001 - a failing plugin must not stop the others
                load_s, load_error = 0.0, one_line(error)
            # Every rank learns whether all of them loaded: they measure this sampler together or not at all.
            load_error = self._first_failure(distributed.all_gather(load_error, self.world))
            if load_error is not None:
                self.errors.append(f"{name}: {load_error}")
                for task in tasks:
                    if self.world.is_main:
                        self._append_failure(task, load_error)
                    self.on_progress(task)
                return
            info = asdict(sampler.describe())
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
        except Exception as error:  # noqa: BLE001 - a failing plugin must not stop the others
            return None, one_line(error)

    def _first_failure(self, errors: list[str | None]) -> str | None:
        """The first failed rank's error, naming the rank when there are several."""
        return next((self.world.label(rank) + error for rank, error in enumerate(errors) if error is not None), None)

    def _requests(self, task: Task) -> list[GenerationRequest]:
        """One request per prompt and batch; image i of prompt p always uses seed + p * num_images + i."""
        n, batch = self.spec.num_images, self.spec.images_per_call
        return [
            GenerationRequest(prompt, task.steps, task.guidance_scale,
                              tuple(self.seed + p * n + i for i in range(start, start + batch)),
                              self.spec.height, self.spec.width)
            for p, prompt in enumerate(self.spec.prompts) for start in range(0, n, batch)
        ]

    def _measure(self, sampler: Sampler, task: Task, load_s: float, info: dict[str, Any]) -> None:
        """Every rank times its share of the task's calls; rank 0 writes what they made into one record."""
        requests = self._requests(task)
        distributed.barrier(self.world)  # all ranks start measuring together, so their wall clocks overlap
        share, error = self._guarded(lambda: self._measure_share(sampler, requests, load_s))
        shares = distributed.gather((share, error), self.world)
        if not self.world.is_main:
            return
        error = self._first_failure([error for _, error in shares])
        if error is None:
            _, error = self._guarded(lambda: self._record(task, requests, [s for s, _ in shares], info))
        if error is not None:
            self._fail(task, error)

    def _measure_share(self, sampler: Sampler, requests: list[GenerationRequest], load_s: float) -> Share:
        """The timing protocol over this rank's round-robin share of the calls (all of them with one process)."""
        mine = distributed.shard(list(enumerate(requests)), self.world)
        warnings = [(number, warning) for number, request in mine for warning in sampler.check(request)]
        calls = [partial(sampler.generate, request) for _, request in mine]
        measurement = timing.measure(calls, self.device, self.spec.timing)
        stage_profile = timing.profile(calls[0], sampler.components(), self.device)
        digests = [_digest(image for output in outputs for image in output) for outputs in measurement.outputs]
        per_call = self.spec.images_per_call
        images = {number * per_call + i: image
                  for (number, _), output in zip(mine, measurement.outputs[-1]) for i, image in enumerate(output)}
        measurement.outputs = []  # every pass's images would travel to rank 0 otherwise
        return Share(self.world.rank, platform.node(), str(self.device), len(calls), load_s, images, warnings,
                     len(set(digests)) == 1, measurement, stage_profile)

    def _record(self, task: Task, requests: list[GenerationRequest], shares: list[Share], info: dict[str, Any]) -> None:
        """Rank 0: the shares' images into the run folder, their timings into one record, metrics, grids."""
        warnings = list(dict.fromkeys(warning for _, warning in sorted(w for share in shares for w in share.warnings)))
        for warning in warnings:
            self.on_warning(warning)
        by_index = {index: image for share in shares for index, image in share.images.items()}
        images = [by_index[index] for index in range(len(by_index))]
        seed_in_names = self.spec.seed
        names = [file_names(task, index, seed_in_names)[0] for index in range(len(images))]
        for image, name in zip(images, names):
            records.save_image_atomic(image, self.outdir / name)

        prompts = [request.prompt for request in requests for _ in request.seeds]
        if task.baseline and self.reference is None:
            self.reference = (f"{task.sampler} {task.steps} steps", images)
        per_call = self.spec.images_per_call
        stats = timing.Stats.from_samples([s for share in shares for s in share.measurement.samples])
        per_image = stats.median / per_call
        # All ranks together: every measured image over the wall clock from the first start to the last finish.
        measured_images = sum(len(share.measurement.samples) for share in shares) * per_call
        wall_s = (max(share.measurement.finished for share in shares)
                  - min(share.measurement.started for share in shares))
        baselines = [t for t in self.tasks if t.baseline]
        record = {
            "schema": records.SCHEMA,
            "status": "ok",
            "created_utc": records.utc_now(),
            "sampler": task.sampler,
            "baseline": task.baseline,
            "steps": task.steps,
            "guidance_scale": task.guidance_scale,
            "sampler_info": info,
            "config": self._config(),
            "environment": self.environment,
            "world_size": self.world.size,
            "timing": {
                "load_s": statistics.median(share.load_s for share in shares),
                "first_call_s": statistics.median(share.measurement.first_call_s for share in shares),
                "seconds_per_call": stats.as_dict(),
                "samples_s": [s for share in shares for s in share.measurement.samples],
                "images_per_call": per_call,
                "seconds_per_image": per_image,
                "images_per_s": 1.0 / per_image,
                "aggregate_images_per_s": measured_images / wall_s if wall_s > 0 else None,
            },
            "unet": _unet_counts(shares[0].profile, per_call),
            "stages": shares[0].profile.as_dict(),
            "memory": {key: max(share.measurement.memory[key] for share in shares)
                       for key in shares[0].measurement.memory},
            "deterministic": all(share.deterministic for share in shares),
            "image_size": list(images[0].size),
            "warnings": warnings,
            "metrics": self._score(task, images, prompts),
            "images": names,
            "grid": file_names(task, 0, seed_in_names)[1],
            "comparisons": [] if task.baseline else [
                {"baseline_sampler": b.sampler, "baseline_steps": b.steps,
                 "path": comparison_name(task, b, seed_in_names)} for b in baselines
            ],
            "ranks": [_rank_entry(share, per_call) for share in shares],
        }
        report.write_grids(self.outdir, record, [r for r in self.records if r.get("baseline") and r["status"] == "ok"])
        self._append(record)

    def _score(self, task: Task, images: list, prompts: list[str]) -> dict[str, dict[str, Any]]:
        """Every requested metric on this measurement's images; a metric that cannot score says why."""
        scores = {}
        for name, metric in self.metrics.items():
            references = None
            if self.model.random_weights:
                scores[name] = {"skipped": f"{self.model.note}: quality metrics mean nothing here"}
                continue
            if metric.needs_reference:
                if task.baseline:
                    scores[name] = {"skipped": "this measurement is the reference"}
                    continue
                if self.reference is None:
                    scores[name] = {"skipped": "no baseline in this run to compare with: add --compare_baseline"}
                    continue
                references = self.reference[1]
            try:
                result = metric.score(MetricInput(images, prompts, references))
            except Exception as error:  # noqa: BLE001 - a failing metric must not lose the timing
                self.on_warning(f"metric {name} on {task.sampler} {task.steps} steps: {one_line(error)}")
                scores[name] = {"error": one_line(error)}
                continue
            if references is not None:
                result["reference"] = self.reference[0]
            scores[name] = {**result, "higher_is_better": metric.higher_is_better}
        return scores

    def _config(self) -> dict[str, Any]:
        config = self.spec.config_dict(self.seed)
        config.update(model=self.model.name, model_location=self.model.location)
        return config

    def _fail(self, task: Task, message: str) -> None:
        self.errors.append(f"{task.sampler} ({task.steps} steps): {message}")
        self._append_failure(task, message)

    def _append_failure(self, task: Task, message: str) -> None:
        self._append({
            "schema": records.SCHEMA,
            "status": "failed",
            "error": message,
            "created_utc": records.utc_now(),
            "sampler": task.sampler,
            "baseline": task.baseline,
            "steps": task.steps,
            "guidance_scale": task.guidance_scale,
            "config": self._config(),
            "environment": self.environment,
            "world_size": self.world.size,
        })

    def _append(self, record: dict[str, Any]) -> None:
        records.append_record(self.records_path, record)
        self.records.append(record)


def _rank_entry(share: Share, images_per_call: int) -> dict[str, Any]:
    """One rank's own figures; its calls are the task's calls rank, rank + world_size, ..."""
    measurement = share.measurement
    return {
        "rank": share.rank,
        "host": share.host,
        "device": share.device,
        "calls": share.calls,
        "load_s": share.load_s,
        "first_call_s": measurement.first_call_s,
        "seconds_per_image": measurement.stats.median / images_per_call,
        "measured_s": measurement.finished - measurement.started,
        "memory": measurement.memory,
    }


def _unet_counts(stage_profile: timing.Profile, images_per_call: int) -> dict[str, Any]:
    """UNet calls per generation call and evaluations per image (CFG doubles the batch)."""
    evaluations = sum(stage_profile.unet_batch_sizes)
    return {
        "calls": stage_profile.unet_calls,
        "batch_sizes": sorted(set(stage_profile.unet_batch_sizes)),
        "evaluations": evaluations,
        "evaluations_per_image": evaluations / images_per_call,
    }


def _digest(images) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()
