"""Runs a benchmark: each sampler is loaded once, measured at each step count by ``harness.timing``,
and its images, grids and records are written as soon as that measurement ends."""

from __future__ import annotations

import errno
import gc
import hashlib
import random
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from harness import models, records, report, timing
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


class BenchRun:
    """One ``harness bench`` invocation; records are appended to ``records.jsonl`` as they finish."""

    def __init__(self, spec: BenchSpec, registry: Registry, on_progress: Callable[[Task], None] = lambda _: None):
        self.spec = spec
        self.registry = registry
        self.on_progress = on_progress
        self.on_warning: Callable[[str], None] = lambda _: None
        self.device = models.resolve_device(spec.device)
        self.dtype = models.resolve_dtype(spec.dtype, self.device)
        self.model = models.resolve_model(spec.model)
        if not spec.prompts:
            spec.prompts = [self.model.default_prompt]
        self.tasks = plan(spec, registry)
        # Without --seed, draw one so the run is still reproducible from its records.
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
        try:
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
        finally:
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
            _, load_s = timing.timed(sampler.load, self.device)
        except Exception as error:  # noqa: BLE001 - a failing plugin must not stop the others
            sampler.unload()  # whatever it loaded before failing must not crowd the next sampler
            self.errors.append(f"{name}: {one_line(error)}")
            for task in tasks:
                self._append_failure(task, one_line(error))
                self.on_progress(task)
            return
        try:
            info = asdict(sampler.describe())
            for task in tasks:
                try:
                    self._measure(sampler, task, load_s, info)
                except torch.cuda.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()  # the next step count starts from a clean cache
                    self._fail(task, "CUDA out of memory: reduce --num_images (or --batch) to 1 and close other "
                                     "GPU applications.")
                except OSError as error:
                    if error.errno in DISK_ERRORS:
                        raise  # nothing more can be written: stop the run
                    self._fail(task, one_line(error))
                except Exception as error:  # noqa: BLE001
                    self._fail(task, one_line(error))
                self.on_progress(task)
        finally:
            sampler.unload()

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
        requests = self._requests(task)
        warnings = list(dict.fromkeys(w for request in requests for w in sampler.check(request)))
        for warning in warnings:
            self.on_warning(warning)
        calls = [partial(sampler.generate, request) for request in requests]
        measurement = timing.measure(calls, self.device, self.spec.timing)
        stage_profile = timing.profile(calls[0], sampler.components(), self.device)

        images = [image for output in measurement.outputs[-1] for image in output]
        digests = [_digest(image for output in outputs for image in output) for outputs in measurement.outputs]
        seed_in_names = self.spec.seed
        names = [file_names(task, index, seed_in_names)[0] for index in range(len(images))]
        for image, name in zip(images, names):
            records.save_image_atomic(image, self.outdir / name)

        prompts = [request.prompt for request in requests for _ in request.seeds]
        if task.baseline and self.reference is None:
            self.reference = (f"{task.sampler} {task.steps} steps", images)
        stats = measurement.stats
        per_image = stats.median / self.spec.images_per_call
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
            "timing": {
                "load_s": load_s,
                "first_call_s": measurement.first_call_s,
                "seconds_per_call": stats.as_dict(),
                "samples_s": measurement.samples,
                "images_per_call": self.spec.images_per_call,
                "seconds_per_image": per_image,
                "images_per_s": 1.0 / per_image,
            },
            "unet": _unet_counts(stage_profile, self.spec.images_per_call),
            "stages": stage_profile.as_dict(),
            "memory": measurement.memory,
            "deterministic": len(set(digests)) == 1,
            "image_size": list(images[0].size),
            "warnings": warnings,
            "metrics": self._score(task, images, prompts),
            "images": names,
            "grid": file_names(task, 0, seed_in_names)[1],
            "comparisons": [] if task.baseline else [
                {"baseline_sampler": b.sampler, "baseline_steps": b.steps,
                 "path": comparison_name(task, b, seed_in_names)} for b in baselines
            ],
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
        })

    def _append(self, record: dict[str, Any]) -> None:
        records.append_record(self.records_path, record)
        self.records.append(record)


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
