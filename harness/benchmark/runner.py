"""Runs a benchmark, in parts that each do one thing and can be tested alone:

- :func:`plan` (pure): the run's measurements (:class:`Task`) and their pipeline calls, from the spec;
- :func:`measure_share`: the timing protocol and the stage profile over one process's share of a task's calls;
- :class:`Scorer`: the quality metrics of a measurement's images, outside the timed region;
- :func:`build_record` (pure): the typed record of a measurement from what every process measured;
- :class:`RunWriter`: every file of the run folder (images, grids, records, summary, plots);
- :class:`BenchRun`: loads each sampler once and moves tasks through these parts, with the other processes
  of a torchrun / accelerate launch job (``harness.benchmark.distributed``) where there are several.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import platform
import random
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.benchmark import distributed, resources, timing
from harness.benchmark.metric import Metric, MetricConfig, MetricInput
from harness.benchmark.sampler import GenerationRequest, Sampler, SamplerConfig
from harness.errors import HarnessError, one_line
from harness.models import loading as models
from harness.models.speed import SpeedOptions
from harness.options import Options, setting
from harness.records import files
from harness.records import store as records
from harness.records.environment import environment
from harness.records.schema import Comparison, Measured, Memory, RankFigures, Record, Stages, Stats, Timing, UnetCounts
from harness.reporting import report

if TYPE_CHECKING:
    from harness.hooks.registry import Registry

# Errors that mean the output disk cannot take more data; the run stops instead of failing every measurement.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


DTYPE_CHOICES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")
MAX_SEED = 2**64 - 1  # torch generators take seeds up to 2**64 - 1


@dataclass(frozen=True)
class BenchOptions(Options):
    """What ``harness bench`` (and ``harness eval``) are asked, one option per field.

    With :class:`harness.benchmark.timing.TimingSettings`, :class:`harness.models.speed.SpeedOptions` and the selected
    plugins' ``Options`` this is every option of the command and the only place their defaults live.
    """

    samplers: tuple[str, ...] = setting(("flash-lcm",), "Sampler(s) to run; several values after one flag or a "
                                                         "repeated flag.", flags=("--sampler", "-s"))
    prompt: str | None = setting(None, "Text prompt (default: a prompt suited to the model).")
    prompts_file: str | None = setting(
        None, "File of prompts (one per line, or JSONL with a 'prompt' field) or a built-in set: held-out (the "
              "embedded model's 64 evaluation prompts), seed (the demo's prompts).", flags=("--prompts",),
        metavar="FILE|SET")
    steps: tuple[int, ...] = setting((2, 4, 8), "Inference steps of the few-step samplers, e.g. --steps 2 4 8.",
                                     minimum=1)
    seed: int | None = setting(None, "Random seed (0 to 2**64-1); also put into file names, as the seed demo does.",
                               minimum=0, maximum=MAX_SEED)
    outdir: str | None = setting(None, "Output folder (default: a new results/<UTC time>-<samplers>/).")
    num_images: int = setting(1, "Images per prompt and step setting.", minimum=1)
    compare_baseline: bool = setting(False, "Also run vanilla-sd and write comparison grids (baseline top, "
                                            "few-step bottom).")
    baseline_steps: int = setting(30, "Steps of baseline samplers.", minimum=1)
    baseline_guidance: float = setting(7.5, "Guidance scale of baseline samplers.", minimum=0)
    baseline_outdir: str | None = setting(None, "Folder for baseline images (default: OUTDIR/baseline).")
    lora_path: str | None = setting(None, "Local LoRA folder or .safetensors file; takes precedence over --lora_id.")
    lora_id: str | None = setting(None, "Hub LoRA id (default: jasperai/flash-sd on SD 1.5, the shipped LoRA on "
                                        "embedded).")
    model: str | None = setting(None, "sd15, sd15-arch (random weights, timing only), embedded, a hub id or a "
                                      "diffusers folder (default: sd15 with CUDA, else embedded).")
    dtype: str | None = setting(None, "Default: float16 on CUDA, float32 elsewhere.", choices=DTYPE_CHOICES)
    device: str | None = setting(None, "cpu, cuda, cuda:N or mps (default: cuda when available).")
    height: int | None = setting(None, "Image height in pixels, a multiple of 8.", minimum=8)
    width: int | None = setting(None, "Image width in pixels, a multiple of 8.", minimum=8)
    metrics: tuple[str, ...] = setting((), "Quality metric(s) scored on every measurement's images, outside the "
                                           "timed region (several values or a repeated flag).", flags=("--metric",))
    batch: int | None = setting(None, "Images per pipeline call (default: all --num_images in one call).",
                                minimum=1)
    overwrite: bool = setting(False, "Replace the records of an earlier run in --outdir.")
    dry_run: bool = setting(False, "Print the plan as JSON and exit without loading models.")
    as_json: bool = setting(False, "Print the records as JSON instead of the table.", flags=("--json",))
    quiet: bool = setting(False, "No progress bar.", flags=("--quiet", "-q"))
    html: bool = setting(False, "Also write OUTDIR/index.html: tables, grids, plots, configuration and environment "
                                "on one self-contained page.")


def default_of(options_class: type, name: str) -> Any:
    """A setting's one default, for the places that need it outside the command line."""
    return next(f.default for f in dataclasses.fields(options_class) if f.name == name)


@dataclass(frozen=True)
class BenchSpec:
    """Everything ``harness bench`` was asked to do, after option parsing; never changed by a run."""

    samplers: tuple[str, ...]
    steps: tuple[int, ...]
    model: str
    outdir: Path
    prompts: tuple[str, ...] = ()  # none: the model's default prompt
    num_images: int = default_of(BenchOptions, "num_images")
    seed: int | None = None
    baseline_steps: int = default_of(BenchOptions, "baseline_steps")
    baseline_guidance: float = default_of(BenchOptions, "baseline_guidance")
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
    sampler_options: Mapping[str, Options] = field(default_factory=dict)  # by sampler name
    metrics: tuple[str, ...] = ()
    metric_options: Mapping[str, Options] = field(default_factory=dict)  # by metric name

    @property
    def images_per_call(self) -> int:
        return self.batch or self.num_images

    def config_dict(self, seed: int | None, prompts: Sequence[str]) -> dict[str, Any]:
        """The run configuration every record carries (flat, as README's Records table lists it)."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config.update(
            samplers=list(self.samplers), steps=list(self.steps), prompts=list(prompts), metrics=list(self.metrics),
            seed=seed, outdir=str(self.outdir),
            baseline_outdir=str(self.baseline_outdir) if self.baseline_outdir else None,
            speed=dataclasses.asdict(self.speed),
            sampler_options=_flat_options(self.sampler_options), metric_options=_flat_options(self.metric_options),
        )
        config.pop("timing")
        config.update(dataclasses.asdict(self.timing))
        return config


def _flat_options(by_plugin: Mapping[str, Options]) -> dict[str, Any]:
    """Every plugin's settings by option name (names are unique across plugins: the CLI enforces it)."""
    return {name: value for options in by_plugin.values() for name, value in dataclasses.asdict(options).items()}


@dataclass(frozen=True)
class Task:
    """One (sampler, steps) measurement and where its files go, relative to the run folder."""

    sampler: str
    steps: int
    guidance_scale: float
    baseline: bool
    folder: str  # "" for the run folder itself
    file_label: str = ""  # the sampler's short name in comparison-grid names ("flash" for flash-lcm)


@dataclass(frozen=True)
class Plan:
    """What a run will do: its measurements in order (baselines first) and the prompts every one draws."""

    tasks: tuple[Task, ...]
    prompts: tuple[str, ...]
    seed: int
    num_images: int
    images_per_call: int
    height: int | None = None
    width: int | None = None

    @property
    def baselines(self) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if task.baseline)

    @property
    def calls_per_task(self) -> int:
        return len(self.prompts) * (self.num_images // self.images_per_call)

    def requests(self, task: Task) -> list[GenerationRequest]:
        """One request per prompt and batch; image i of prompt p always uses seed + p * num_images + i."""
        n, batch = self.num_images, self.images_per_call
        return [
            GenerationRequest(
                prompt,
                task.steps,
                task.guidance_scale,
                tuple(self.seed + p * n + i for i in range(start, start + batch)),
                self.height,
                self.width,
            )
            for p, prompt in enumerate(self.prompts)
            for start in range(0, n, batch)
        ]


def plan(spec: BenchSpec, registry: Registry, default_prompt: str, seed: int) -> Plan:
    """Baselines first, so each few-step measurement can be compared with them as soon as it ends."""
    classes = {name: registry.sampler(name).cls for name in spec.samplers}
    baselines = [n for n in spec.samplers if classes[n].is_baseline]
    few_step = [n for n in spec.samplers if not classes[n].is_baseline]
    baseline_root = _baseline_folder(spec)
    tasks = []
    for name in baselines:
        folder = baseline_root if len(baselines) == 1 else f"{baseline_root}/{name}"
        tasks.append(
            Task(name, spec.baseline_steps, spec.baseline_guidance, True, folder, classes[name].file_label or name)
        )
    for name in few_step:
        folder = "" if len(few_step) == 1 else name
        tasks += [
            Task(name, steps, classes[name].default_guidance, False, folder, classes[name].file_label or name)
            for steps in spec.steps
        ]
    return Plan(
        tuple(tasks),
        spec.prompts or (default_prompt,),
        seed,
        spec.num_images,
        spec.images_per_call,
        spec.height,
        spec.width,
    )


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


# What file_names and comparison_name call a run's images, grids and comparisons: an --overwrite run replaces
# these in the run folder, and no other file a user keeps there.
RUN_IMAGE = re.compile(r"(image|baseline)_s\d+_i\d+(_seed\d+)?\.png|grid_(baseline_)?s\d+(_seed\d+)?\.png"
                       r"|compare_.+\.png")


def seed_suffix(seed: int | None) -> str:
    return "" if seed is None else f"_seed{seed}"


def file_names(task: Task, index: int, seed: int | None) -> tuple[str, str]:
    """The seed's names: (image ``index``, the task's grid), relative to the run folder."""
    prefix = "baseline" if task.baseline else "image"
    grid = f"grid_baseline_s{task.steps}" if task.baseline else f"grid_s{task.steps}"
    folder = f"{task.folder}/" if task.folder else ""
    suffix = seed_suffix(seed)
    return f"{folder}{prefix}_s{task.steps}_i{index}{suffix}.png", f"{folder}{grid}{suffix}.png"


def comparison_name(task: Task, baseline: Task, baselines: int, seed: int | None) -> str:
    """The seed's ``compare_baseline30_flash4_seed42.png``, named after the sampler (``file_label``); with
    several baselines each one's name replaces ``baseline``, so no two comparisons share a file."""
    folder = f"{task.folder}/" if task.folder else ""
    top = "baseline" if baselines == 1 else baseline.file_label
    return f"{folder}compare_{top}{baseline.steps}_{task.file_label}{task.steps}{seed_suffix(seed)}.png"


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
    profile: Stages


def measure_share(
    sampler: Sampler,
    requests: Sequence[GenerationRequest],
    load_s: float,
    device: torch.device,
    settings: timing.TimingSettings,
    world: distributed.World,
) -> Share:
    """The timing protocol over this rank's round-robin share of the calls (all of them with one process)."""
    mine = distributed.shard(list(enumerate(requests)), world)
    warnings = [(number, warning) for number, request in mine for warning in sampler.check(request)]
    calls = [partial(sampler.generate, request) for _, request in mine]
    measurement = timing.measure(calls, device, settings)
    per_call = requests[0].num_images
    stage_profile = timing.profile(calls[0], sampler.components(), device, per_call)
    problem = nonfinite_problem(stage_profile, per_call)
    if problem is not None:
        if stage_profile.nonfinite_images == per_call:
            raise HarnessError(problem)  # every image is blank: no figure of this measurement means anything
        warnings.append((mine[0][0], problem))
    digests = [_digest(image for output in outputs for image in output) for outputs in measurement.outputs]
    images = {
        number * per_call + i: image
        for (number, _), output in zip(mine, measurement.outputs[-1])
        for i, image in enumerate(output)
    }
    measurement.outputs = []  # every pass's images would travel to rank 0 otherwise
    return Share(
        world.rank,
        platform.node(),
        str(device),
        len(calls),
        load_s,
        images,
        warnings,
        len(set(digests)) == 1,
        measurement,
        stage_profile,
    )


def nonfinite_problem(stages: Stages, images: int) -> str | None:
    """What the instrumented call's check for NaN and inf found, in one line; None when every value was finite."""
    found = []
    if stages.nonfinite_unet_calls:
        found.append(f"the UNet gave NaN or inf values in {stages.nonfinite_unet_calls} of {stages.unet_calls} calls")
    if stages.nonfinite_images == images:
        found.append("every decoded image is NaN or inf")
    elif stages.nonfinite_images:
        found.append(f"{stages.nonfinite_images} of {images} decoded images are NaN or inf")
    if not found:
        return None
    return (f"{' and '.join(found)} (the instrumented call); with float16 or bfloat16 try --dtype float32 (half "
            "precision overflows in some UNets and VAEs), otherwise check the model's and the LoRA's weights for NaN.")


@dataclass(frozen=True)
class Reference:
    """The images quality metrics compare with: the first baseline's, and which baseline that is."""

    label: str
    images: list[Any]


class Scorer:
    """Every requested metric on a measurement's images; a metric that cannot score says why in the record."""

    def __init__(
        self, metrics: Mapping[str, Metric], random_weights_note: str | None, on_warning: Callable[[str], None]
    ):
        self.metrics = metrics
        self.random_weights_note = random_weights_note
        self.on_warning = on_warning

    def score(
        self, task: Task, images: list[Any], prompts: list[str], reference: Reference | None
    ) -> dict[str, dict[str, Any]]:
        scores: dict[str, dict[str, Any]] = {}
        for name, metric in self.metrics.items():
            references = None
            if self.random_weights_note is not None:
                scores[name] = {"skipped": f"{self.random_weights_note}: quality metrics mean nothing here"}
                continue
            if metric.needs_reference:
                if task.baseline:
                    scores[name] = {"skipped": "this measurement is the reference"}
                    continue
                if reference is None:
                    scores[name] = {"skipped": "no baseline in this run to compare with: add --compare_baseline"}
                    continue
                references = reference.images
            try:
                result = metric.score(MetricInput(images, prompts, references))
            except Exception as error:  # noqa: BLE001 - a failing metric must not lose the timing
                self.on_warning(f"metric {name} on {task.sampler} {task.steps} steps: {one_line(error)}")
                scores[name] = {"error": one_line(error)}
                continue
            if reference is not None and references is not None:
                result["reference"] = reference.label
            scores[name] = {**result, "higher_is_better": metric.higher_is_better}
        return scores


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
            config=self.config,
            environment=self.environment,
            world_size=self.world_size,
            error=error,
            measured=measured,
        )

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
    per_call = len(image_names) // sum(share.calls for share in shares)
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

    def save_images(self, images: Sequence[Any], names: Sequence[str]) -> None:
        for image, name in zip(images, names):
            files.save_image_atomic(image, self.outdir / name)

    def add(self, record: Record) -> None:
        """Append the record to ``records.jsonl`` (and its grids first, when it has images)."""
        if record.measured is not None:
            report.write_grids(self.outdir, record, [r for r in self.records if r.baseline and r.ok])
        records.append_record(self.records_path, record)
        self.records.append(record)

    def write_summary(self) -> None:
        report.write_summary(self.outdir, self.records)


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
                try:
                    self.writer.write_summary()
                except OSError:
                    pass  # the records are the source of truth: `harness report` rebuilds the summary from them
        return self.records

    def _run_sampler(self, name: str, tasks: list[Task]) -> None:
        cls = self.registry.sampler(name).cls
        sampler = cls(self.sampler_config(), self.spec.sampler_options.get(name))
        try:
            try:
                _, load_s = timing.timed(sampler.load, self.device)
                load_error = None
            except Exception as error:  # noqa: BLE001 - a failing plugin must not stop the others
                load_s, load_error = 0.0, one_line(error)
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
        except Exception as error:  # noqa: BLE001 - a failing plugin must not stop the others
            return None, one_line(error)

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
        self.writer.add(record)


def _digest(images: Any) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()
