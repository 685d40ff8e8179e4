"""The timing protocol. Every sampler is measured here and only here.

1. ``timed(load)``: the pipeline is built once; its time is ``load_s``.
2. The first call is timed alone (``first_call_s``): it pays for lazy initialisation, compilation and
   autotuning, which a steady-state number must not include.
3. ``warmup`` more calls, not recorded.
4. ``repeats`` passes over the calls (and more while the total is under ``min_time_s``), each call
   bracketed by a device synchronize and ``time.perf_counter()``, with the garbage collector off.
5. Peak memory over steps 2-4: CUDA max allocated and reserved; elsewhere the process's peak RSS.

Stage breakdown and UNet-evaluation counts come from one extra, instrumented call (:func:`profile`)
made after the measured repeats, so the hooks and synchronizes it needs never touch the timed calls.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


@dataclass
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

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    position = (len(ordered) - 1) * pct / 100
    lower, upper = math.floor(position), math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(frozen=True)
class TimingSettings:
    warmup: int = 1
    repeats: int = 3
    min_time_s: float = 0.0


@dataclass
class Measurement:
    first_call_s: float
    samples: list[float]  # seconds of each measured call, in order
    outputs: list[list[Any]]  # outputs[pass][call]: what each measured call returned
    memory: dict[str, float]
    # Wall-clock time (time.time(), comparable between processes and NTP-synced machines) at the start of
    # the first measured call and the end of the last: several processes' throughput is measured over these.
    started: float = 0.0
    finished: float = 0.0

    @property
    def stats(self) -> Stats:
        return Stats.from_samples(self.samples)


def measure(calls: Sequence[Callable[[], Any]], device: torch.device, settings: TimingSettings) -> Measurement:
    """Run the protocol over ``calls`` (one call per prompt); see the module docstring."""
    memory = MemoryTracker(device)
    memory.reset()
    _, first_call_s = timed(calls[0], device)
    for index in range(settings.warmup):
        calls[index % len(calls)]()

    samples: list[float] = []
    outputs: list[list[Any]] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.time()
    try:
        passes = 0
        while passes < settings.repeats or sum(samples) < settings.min_time_s:
            pass_outputs = []
            for call in calls:
                output, seconds = timed(call, device)
                samples.append(seconds)
                pass_outputs.append(output)
            outputs.append(pass_outputs)
            passes += 1
    finally:
        finished = time.time()
        if gc_was_enabled:
            gc.enable()
    return Measurement(first_call_s, samples, outputs, memory.read(), started, finished)


class MemoryTracker:
    """Peak memory of the measured region: CUDA allocator peaks, or the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) for this process.
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def read(self) -> dict[str, float]:
        mib = 1024 * 1024
        if self.device.type == "cuda":
            return {
                "cuda_max_allocated_mb": torch.cuda.max_memory_allocated(self.device) / mib,
                "cuda_max_reserved_mb": torch.cuda.max_memory_reserved(self.device) / mib,
            }
        return {"peak_rss_mb": _peak_rss_bytes() / mib}


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not on Windows; there the RSS peak is simply unavailable

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Profile:
    """Where the time of one call goes, and how many UNet evaluations it made."""

    total_s: float
    text_encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    per_step_s: list[float] = field(default_factory=list)
    unet_batch_sizes: list[int] = field(default_factory=list)

    @property
    def unet_calls(self) -> int:
        return len(self.unet_batch_sizes)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "unet_calls": self.unet_calls}


def profile(call: Callable[[], Any], components: dict[str, torch.nn.Module], device: torch.device) -> Profile:
    """Time one call stage by stage with synchronizing forward hooks on the sampler's components.

    Text encoding and decoding are the summed durations of those modules' forwards; the denoising
    loop runs from the first UNet call's start to the last one's end (scheduler steps included);
    step ``i`` lasts from UNet call ``i``'s start to call ``i+1``'s start (the last one to its end).
    """
    durations: dict[str, float] = {"text_encoder": 0.0, "decoder": 0.0}
    starts: dict[str, float] = {}
    unet_starts: list[float] = []
    unet_ends: list[float] = []
    batch_sizes: list[int] = []
    handles = []

    def stamp() -> float:
        synchronize(device)
        return time.perf_counter()

    for role in ("text_encoder", "decoder"):
        module = components.get(role)
        if module is None:
            continue

        def before(_module, _args, _role=role):
            starts[_role] = stamp()

        def after(_module, _args, _output, _role=role):
            durations[_role] += stamp() - starts[_role]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    denoiser = components.get("denoiser")
    if denoiser is not None:

        def unet_before(_module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample")
            batch_sizes.append(int(sample.shape[0]))
            unet_starts.append(stamp())

        def unet_after(_module, _args, _output):
            unet_ends.append(stamp())

        handles += [
            denoiser.register_forward_pre_hook(unet_before, with_kwargs=True),
            denoiser.register_forward_hook(unet_after),
        ]
    try:
        _, total_s = timed(call, device)
    finally:
        for handle in handles:
            handle.remove()

    per_step = [b - a for a, b in zip(unet_starts, unet_starts[1:])]
    if unet_starts:
        per_step.append(unet_ends[-1] - unet_starts[-1])
    return Profile(
        total_s=total_s,
        text_encode_s=durations["text_encoder"],
        denoise_s=(unet_ends[-1] - unet_starts[0]) if unet_starts else 0.0,
        decode_s=durations["decoder"],
        per_step_s=per_step,
        unet_batch_sizes=batch_sizes,
    )
