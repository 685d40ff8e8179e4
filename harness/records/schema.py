"""The record schema as types: what ``records.jsonl`` holds, one :class:`Record` per line.

Writers build records from these classes and ``to_json()`` them; every reader (report, plots, compare, the
HTML page, the distributed merge) gets them back through :func:`Record.from_json`, which checks the schema
version and the type of every field, so a reader works on fields, never on string keys of unchecked JSON.
The JSON is flat (``timing``, ``unet``, ... beside ``sampler``); a failed measurement has ``error`` and no
measured fields, which here is ``Record.measured is None``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from harness.errors import RecordError

SCHEMA = "harness.record/1"
# The names a record gives its images and grids: harness writes PNGs, and a reader writes grids under these names,
# so a name of any other kind (records.jsonl, summary.md) would let a record overwrite a file of its run.
IMAGE_SUFFIX = ".png"
NAME_MAX = 255  # bytes in one part of a file name (Linux, macOS); a longer name fails at every open


@dataclass(frozen=True)
class Stats:
    """Summary statistics of a list of durations, in seconds."""

    n: int
    min: float
    max: float
    mean: float
    median: float
    stdev: float
    p90: float
    iqr: float

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        return cls(
            n=len(ordered),
            min=ordered[0],
            max=ordered[-1],
            mean=statistics.fmean(ordered),
            median=statistics.median(ordered),
            stdev=statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            p90=_percentile(ordered, 90),
            iqr=_percentile(ordered, 75) - _percentile(ordered, 25),
        )


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    position = (len(ordered) - 1) * pct / 100
    lower, upper = math.floor(position), math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


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
    images: list[str]
    grid: str
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    ranks: list[RankFigures] = field(default_factory=list)


@dataclass(frozen=True)
class Record:
    """One (sampler, steps) measurement of a run: ``measured`` when it succeeded, ``error`` when it failed."""

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
        plain = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name not in ("schema", "error", "measured")}
        measured = {} if self.measured is None else _plain(self.measured)
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
        record: Record = _convert(cls, record_data, "")
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
        prompts = record.config.get("prompts", [])
        if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
            raise _wrong("config.prompts", "a list of texts", prompts)
        return record


def _check_files(measured: Measured) -> None:
    """The image size and the files a measurement names, as harness writes them: readers open and write these."""
    size = measured.image_size
    if len(size) != 2 or min(size) < 1:
        raise RecordError(f"'image_size' is {size}; it is [width, height], two whole numbers above 0")
    if not measured.images:
        raise RecordError("'images' is empty; a measurement names the 1 or more images it made")
    names = [(f"images[{index}]", name) for index, name in enumerate(measured.images)]
    names += [("grid", measured.grid)]
    names += [(f"comparisons[{index}].path", c.path) for index, c in enumerate(measured.comparisons)]
    for where, name in names:
        problem = _file_name_problem(name)
        if problem is not None:
            raise RecordError(f"'{where}' {_shown(name)} {problem}")


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
                                  or isinstance(value, int) and not _fits_float(value)):
            raise _wrong(f"metrics.{name}.value", "a number or null", value)


def _fits_float(value: float) -> bool:
    """Whether a JSON number is a finite float or a whole number that converts to one: readers divide and plot them.

    (``math.isfinite`` raises OverflowError on a whole number beyond the float range.)"""
    return abs(value) <= sys.float_info.max


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Memory holds only the figures its device has (CUDA's or the CPU's): the others are left out.
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) is not None or not isinstance(value, Memory)}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _convert(kind: Any, value: Any, where: str) -> Any:
    """``value`` (parsed JSON) as ``kind``, or RecordError naming ``where`` and what is wrong."""
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(kind):
        return _convert_dataclass(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(where, "a list", value)
        (item,) = typing.get_args(kind)
        return [_convert(item, element, f"{where}[{index}]") for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        _, item = typing.get_args(kind)
        return {key: _convert(item, element, f"{where}.{key}") for key, element in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise _wrong(where, "true or false", value)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(where, "a whole number", value)
        if not _fits_float(value):
            raise _wrong(where, "a whole number between -1.8e308 and 1.8e308", value)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _fits_float(value):
            raise _wrong(where, "a finite number", value)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise _wrong(where, "text", value)
        return value
    raise TypeError(f"no JSON conversion for {kind!r}")


@functools.cache
def _type_hints(kind: type) -> dict[str, Any]:
    """A record class's resolved field types; resolving them is slow and every record of a file needs them."""
    return typing.get_type_hints(kind)


def _convert_dataclass(kind: Any, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise _wrong(where or kind.__name__, "an object", value)
    hints = _type_hints(kind)
    arguments = {}
    for f in dataclasses.fields(kind):
        # A record's measured fields sit beside its own in the JSON, so they are named without a prefix.
        flat = kind is Record and f.name == "measured"
        path = where if flat else f"{where}.{f.name}" if where else f.name
        if f.name in value:
            arguments[f.name] = _convert(hints[f.name], value[f.name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"'{path}' is missing")
    return kind(**arguments)


def _wrong(where: str, expected: str, value: Any) -> RecordError:
    return RecordError(f"'{where}' should be {expected}, not {_shown(value)}")


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def successful(records: Iterable[Record]) -> list[tuple[Record, Measured]]:
    """The records that measured something, each with its figures (so readers need no None checks)."""
    return [(record, record.measured) for record in records if record.measured is not None]


def successful_baselines(records: Iterable[Record]) -> list[tuple[Record, Measured]]:
    """The successful baseline measurements, in run order (the first is the reference of speedups)."""
    return [(record, measured) for record, measured in successful(records) if record.baseline]
