"""The record schema as types: what ``records.jsonl`` holds, one :class:`Record` per line.

Writers build records from these classes and ``to_json()`` them; every reader (report, plots, compare, the
HTML page, the distributed merge) gets them back through :func:`Record.from_json`, which checks the schema
version and the type of every field, so a reader works on fields, never on string keys of unchecked JSON.
The JSON is flat (``timing``, ``unet``, ... beside ``sampler``); a failed measurement has ``error`` and no
measured fields, which here is ``Record.measured is None``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.errors import RecordError
from harness.records.decode import fits_float, from_plain, shown, to_plain, wrong
from harness.records.stats import Stats

SCHEMA = "harness.record/1"
# The names a record gives its images and grids: harness writes PNGs, and a reader writes grids under these names,
# so a name of any other kind (records.jsonl, summary.md) would let a record overwrite a file of its run.
IMAGE_SUFFIX = ".png"
NAME_MAX = 255  # bytes in one part of a file name (Linux, macOS); a longer name fails at every open
# The largest step count and guidance scale harness runs (its options stop there): a record beyond them, or below
# 1 step or guidance 0, was not written by harness, and readers refuse it.
MAX_STEPS = 10_000
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class Timing:
    """The timing protocol's figures for one measurement (over every rank's calls)."""

    load_s: float
    first_call_s: float
    seconds_per_call: Stats
    samples_s: list[float]
    images_per_call: int
    seconds_per_image: float
    images_per_s: float
    aggregate_images_per_s: float | None = None


@dataclass(frozen=True)
class Stages:
    """Where the time of one instrumented call goes, and the UNet calls it made (their batch sizes)."""

    total_s: float
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    per_step_s: list[float] = field(default_factory=list)
    unet_batch_sizes: list[int] = field(default_factory=list)
    unet_calls: int = 0
    # NaN or inf: the UNet calls whose output held one, and the call's images the VAE decoder gave one in.
    nonfinite_unet_calls: int = 0
    nonfinite_images: int = 0

    @property
    def other_s(self) -> float:
        return self.total_s - self.text_encode_s - self.denoise_s - self.decode_s


@dataclass(frozen=True)
class UnetCounts:
    """UNet calls per generation call and evaluations (batch sizes summed: CFG doubles them)."""

    calls: int
    batch_sizes: list[int]
    evaluations: int
    evaluations_per_image: float


@dataclass(frozen=True)
class Memory:
    """Peak memory over the measured calls: CUDA's allocated and reserved, or the CPU process's peak RSS."""

    json_omit_none = True  # only the figures its device has

    cuda_max_allocated_mb: float | None = None
    cuda_max_reserved_mb: float | None = None
    peak_rss_mb: float | None = None

    @property
    def peak_mb(self) -> float | None:
        return self.cuda_max_allocated_mb if self.cuda_max_allocated_mb is not None else self.peak_rss_mb

    @classmethod
    def largest(cls, memories: Sequence[Memory]) -> Memory:
        """Each figure's largest value over several processes."""
        def most(name: str) -> float | None:
            values = [getattr(m, name) for m in memories if getattr(m, name) is not None]
            return max(values) if values else None

        return cls(**{f.name: most(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Comparison:
    """A comparison grid of a few-step record against one baseline record."""

    baseline_sampler: str
    baseline_steps: int
    path: str


@dataclass(frozen=True)
class RankFigures:
    """One process's own figures; its calls are the task's calls rank, rank + world_size, ..."""

    rank: int
    host: str
    device: str
    calls: int
    load_s: float
    first_call_s: float
    seconds_per_image: float
    measured_s: float
    memory: Memory


@dataclass(frozen=True)
class Measured:
    """Everything a successful measurement adds to its record."""

    sampler_info: dict[str, Any]
    timing: Timing
    unet: UnetCounts
    stages: Stages
    memory: Memory
    deterministic: bool
    image_size: list[int]
    images: list[str]  # the images written (all, the first few or none: --save_images)
    grid: str  # "" when no image was written
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    ranks: list[RankFigures] = field(default_factory=list)
    images_made: int | None = None  # None in records before --save_images: then every image made is named


@dataclass(frozen=True)
class Record:
    """One (sampler, steps) measurement of a run: ``measured`` when it succeeded, ``error`` when it failed."""

    json_flat = ("measured",)  # its measured figures sit beside its own fields in the JSON

    sampler: str
    baseline: bool
    steps: int
    guidance_scale: float
    created_utc: str
    config: dict[str, Any]
    environment: dict[str, Any]
    world_size: int = 1
    error: str | None = None
    measured: Measured | None = None
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        if (self.measured is None) == (self.error is None):
            raise ValueError("a record has either measured figures or an error")

    @property
    def status(self) -> str:
        return "ok" if self.measured is not None else "failed"

    @property
    def ok(self) -> bool:
        return self.measured is not None

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of ``records.jsonl`` (fields that are None are left out of nested parts)."""
        head = {"schema": self.schema, "status": self.status}
        if self.error is not None:
            head["error"] = self.error
        plain = {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in ("schema", "error", "measured")}
        measured = {} if self.measured is None else to_plain(self.measured)
        return {**head, **plain, **measured}

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """Check and convert one JSON object; a problem raises :class:`RecordError` naming the field."""
        if not isinstance(data, dict):
            raise RecordError(f"a {type(data).__name__}, not a JSON object")
        if data.get("schema") != SCHEMA:
            raise RecordError(f"schema {data.get('schema')!r} is not {SCHEMA!r} (written by another harness version "
                              "or another program)")
        status = data.get("status")
        if status not in ("ok", "failed"):
            raise RecordError(f"status {status!r} is neither 'ok' nor 'failed'")
        own = {f.name for f in dataclasses.fields(cls)} - {"measured"}
        measured_names = {f.name for f in dataclasses.fields(Measured)}
        record_data = {name: value for name, value in data.items() if name in own}
        if status == "ok":
            record_data["measured"] = {name: value for name, value in data.items() if name in measured_names}
            record_data.pop("error", None)
        elif not isinstance(data.get("error"), str):
            raise RecordError("a failed record without its 'error' text")
        record: Record = from_plain(cls, record_data, "")
        if record.measured is not None:
            timing, stages = record.measured.timing, record.measured.stages
            for name, value in (("timing.seconds_per_call.median", timing.seconds_per_call.median),
                                ("timing.seconds_per_image", timing.seconds_per_image),
                                ("timing.images_per_s", timing.images_per_s), ("stages.total_s", stages.total_s)):
                if not value > 0:
                    raise RecordError(f"'{name}' is {value}; a measured time is above 0")
            if timing.images_per_call < 1:
                raise RecordError(f"'timing.images_per_call' is {timing.images_per_call}; a call makes 1 image or more")
            if not 0 <= stages.denoise_s <= stages.total_s:
                raise RecordError(f"'stages.denoise_s' is {stages.denoise_s}; denoising is part of the call, 0 to "
                                  f"'stages.total_s' ({stages.total_s}) seconds")
            if record.measured.unet.evaluations < 0:
                raise RecordError(f"'unet.evaluations' is {record.measured.unet.evaluations}; a count is 0 or more")
            _check_files(record.measured)
            _check_metrics(record.measured.metrics)
        _check_ranges(record)
        prompts = record.config.get("prompts", [])
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise wrong("config.prompts", "a list of texts", prompts)
        digest = record.config.get("prompts_sha256")
        if digest is not None and (not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest)):
            raise wrong("config.prompts_sha256", "a SHA-256 digest in hex", digest)
        return record


def _check_ranges(record: Record) -> None:
    """Values harness never writes (a negative step count, an absurd guidance, a negative time or count) are
    refused: a reader would divide by them, size tables and grids by them, or report them as measured."""
    _within("steps", record.steps, 1, MAX_STEPS, "harness runs 1 to 10000 steps")
    _within("guidance_scale", record.guidance_scale, 0, MAX_GUIDANCE, "harness runs guidance 0 to 100")
    _within("world_size", record.world_size, 1, None, "a run has 1 process or more")
    measured = record.measured
    if measured is None:
        return
    timing, stats, unet, stages = measured.timing, measured.timing.seconds_per_call, measured.unet, measured.stages
    for name, value in (("timing.load_s", timing.load_s), ("timing.first_call_s", timing.first_call_s),
                        ("timing.seconds_per_call.stdev", stats.stdev), ("timing.seconds_per_call.iqr", stats.iqr),
                        ("stages.text_encode_s", stages.text_encode_s), ("stages.decode_s", stages.decode_s),
                        ("unet.evaluations_per_image", unet.evaluations_per_image),
                        *((f"stages.per_step_s[{i}]", s) for i, s in enumerate(stages.per_step_s)),
                        *((f"memory.{f.name}", getattr(measured.memory, f.name))
                          for f in dataclasses.fields(Memory) if getattr(measured.memory, f.name) is not None)):
        _within(name, value, 0, None, "a measured time, size or count is 0 or more")
    for name, count in (("unet.calls", unet.calls), ("stages.unet_calls", stages.unet_calls),
                        ("stages.nonfinite_unet_calls", stages.nonfinite_unet_calls),
                        ("stages.nonfinite_images", stages.nonfinite_images)):
        _within(name, count, 0, None, "a count is 0 or more")
    _within("timing.seconds_per_call.n", stats.n, 1, None, "a measurement times 1 call or more")
    for index, sample in enumerate(timing.samples_s):
        if not sample > 0:
            raise RecordError(f"'timing.samples_s[{index}]' is {sample}; a measured time is above 0")
    if not 0 < stats.min <= stats.median <= stats.max:
        raise RecordError(f"'timing.seconds_per_call' has min {stats.min}, median {stats.median}, max {stats.max}; "
                          "measured times are above 0 and the median lies between the smallest and the largest")
    for index, size in enumerate(unet.batch_sizes + stages.unet_batch_sizes):
        _within(f"unet batch_sizes[{index}]", size, 1, None, "a UNet call evaluates 1 latent or more")
    for index, comparison in enumerate(measured.comparisons):
        _within(f"comparisons[{index}].baseline_steps", comparison.baseline_steps, 1, MAX_STEPS,
                "harness runs 1 to 10000 steps")
    for index, rank in enumerate(measured.ranks):
        _within(f"ranks[{index}].rank", rank.rank, 0, record.world_size - 1, "a rank is 0 to world_size - 1")
        _within(f"ranks[{index}].calls", rank.calls, 0, None, "a count is 0 or more")
        if not rank.seconds_per_image > 0:
            raise RecordError(f"'ranks[{index}].seconds_per_image' is {rank.seconds_per_image}; a measured time is "
                              "above 0")


def _within(name: str, value: float, low: float, high: float | None, rule: str) -> None:
    if not low <= value or (high is not None and value > high):
        raise RecordError(f"'{name}' is {value}; {rule}")


def _check_files(measured: Measured) -> None:
    """The image size and the files a measurement names, as harness writes them: readers open and write these."""
    size = measured.image_size
    if len(size) != 2 or min(size) < 1:
        raise RecordError(f"'image_size' is {size}; it is [width, height], two whole numbers above 0")
    if measured.images_made is not None and measured.images_made < max(len(measured.images), 1):
        raise RecordError(f"'images_made' is {measured.images_made}; a measurement makes 1 image or more, and at "
                          f"least the {len(measured.images)} it names")
    if not measured.images and measured.images_made is None:
        raise RecordError("'images' is empty; a measurement names the 1 or more images it made")
    if bool(measured.images) != bool(measured.grid):
        raise RecordError("'grid' and 'images' are both named or both empty; a grid shows the images a record names")
    names = [(f"images[{index}]", name) for index, name in enumerate(measured.images)]
    names += [("grid", measured.grid)] if measured.grid else []
    names += [(f"comparisons[{index}].path", c.path) for index, c in enumerate(measured.comparisons)]
    for where, name in names:
        problem = _file_name_problem(name)
        if problem is not None:
            raise RecordError(f"'{where}' {shown(name)} {problem}")


def _file_name_problem(name: str) -> str | None:
    """Why ``name`` is not the name of a PNG file harness could have written, or None when it is."""
    if "\x00" in name:
        return "holds a NUL character, which no file name can"
    try:
        parts = [os.fsencode(part) for part in name.split("/")]
    except UnicodeEncodeError:
        return "holds characters no file name can"
    if max(len(part) for part in parts) > NAME_MAX:
        return f"has a part longer than {NAME_MAX} bytes, which no file name can"
    stem = name.rsplit("/", 1)[-1]
    if not stem.lower().endswith(IMAGE_SUFFIX) or len(stem) == len(IMAGE_SUFFIX):
        return f"is not the name of a {IMAGE_SUFFIX} image"
    return None


def _check_metrics(metrics: dict[str, dict[str, Any]]) -> None:
    """A metric's ``value``: a number, NaN and infinity included (PSNR of identical images), or null."""
    for name, result in metrics.items():
        value = result.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or isinstance(value, int) and not fits_float(value)):
            raise wrong(f"metrics.{name}.value", "a number or null", value)


def successful(records: Iterable[Record]) -> list[tuple[Record, Measured]]:
    """The records that measured something, each with its figures (so readers need no None checks)."""
    return [(record, record.measured) for record in records if record.measured is not None]


def successful_baselines(records: Iterable[Record]) -> list[tuple[Record, Measured]]:
    """The successful baseline measurements, in run order (the first is the reference of speedups)."""
    return [(record, measured) for record, measured in successful(records) if record.baseline]
