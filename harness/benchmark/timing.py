"""The timing protocol. Every sampler is measured here and only here.

1. ``timed(load)``: the pipeline is built once; its time is ``load_s``.
2. The first call is timed alone (``first_call_s``): it pays for lazy initialisation, compilation and
   autotuning, which a steady-state number must not include.
3. ``warmup`` more calls, not recorded.
4. ``repeats`` passes over the calls (and more while the total is under ``min_time_s``), each call
   bracketed by a device synchronize and ``time.perf_counter()``, with the garbage collector off.
5. Peak memory over steps 2-4: CUDA max allocated and reserved; elsewhere the process's peak RSS.

Stage breakdown, UNet-evaluation counts and the check for NaN and inf come from one extra, instrumented
call (:func:`profile`) made after the measured repeats, so the hooks and synchronizes it needs never touch
the timed calls.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.options import Options, setting
from harness.records.schema import Stages
from harness.records.stats import Stats


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


@dataclass(frozen=True)
class TimingSettings(Options):
    """The protocol's knobs; ``harness bench`` makes one option of each, so this is their only default."""

    warmup: int = setting(2, "Unrecorded calls after the first call.", minimum=0)
    repeats: int = setting(5, "Measured passes over the prompts.", minimum=1)
    min_time_s: float = setting(0.0, "Keep measuring until this many seconds are recorded.", minimum=0,
                                flags=("--min-time", "--min_time"))


@dataclass
class Measurement:
    first_call_s: float
    samples: list[float]  # seconds of each measured call, in order
    memory: dict[str, float]
    # Wall-clock time (time.time(), comparable between processes and NTP-synced machines) at the start of
    # the first measured call and the end of the last, less handled_s: several processes' throughput is
    # measured over these.
    started: float = 0.0
    finished: float = 0.0
    handled_s: float = 0.0  # seconds spent in on_output between the measured calls (metrics, saving images)

    @property
    def stats(self) -> Stats:
        return Stats.from_samples(self.samples)


OutputHandler = Callable[[int, int, Any], None]


def measure(calls: Sequence[Callable[[], Any]], device: torch.device, settings: TimingSettings,
            on_output: OutputHandler | None = None) -> Measurement:
    """Run the protocol over ``calls`` (one call per prompt); see the module docstring.

    ``on_output(pass, call, output)`` receives what each measured call returned, outside its timed bracket,
    with the garbage collector enabled and the peak-memory reading paused: what it does (score metrics, write
    images) is in neither the samples, nor the wall-clock span, nor the peak memory. Nothing is kept here, so
    a measurement of any number of calls holds one call's output at a time.
    """
    memory = MemoryTracker(device)
    memory.reset()
    _, first_call_s = timed(calls[0], device)
    for index in range(settings.warmup):
        calls[index % len(calls)]()

    samples: list[float] = []
    handled_s = 0.0
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.time()
    try:
        passes = 0
        while passes < settings.repeats or sum(samples) < settings.min_time_s:
            for number, call in enumerate(calls):
                output, seconds = timed(call, device)
                samples.append(seconds)
                if on_output is not None:
                    handled_s += _handle(on_output, passes, number, output, memory)
            passes += 1
    finally:
        finished = time.time()
        if gc_was_enabled:
            gc.enable()
    return Measurement(first_call_s, samples, memory.read(), started, finished - handled_s, handled_s)


def _handle(on_output: OutputHandler, number: int, call: int, output: Any, memory: MemoryTracker) -> float:
    """``on_output`` outside the measured region; its seconds."""
    start = time.perf_counter()
    memory.pause()
    # The collector runs while the handler does (its thresholds decide when), so the cycles of thousands of calls
    # are collected as the run goes; a full collection per call would cost more than the call on a small model.
    gc.enable()
    try:
        on_output(number, call, output)
    finally:
        gc.disable()
        memory.resume()
    return time.perf_counter() - start


class MemoryTracker:
    """Peak memory of the measured region: CUDA allocator peaks, or the process's peak RSS.

    :meth:`pause` and :meth:`resume` leave out what happens between them: the peak so far is kept aside and
    the counters start again from what is held when the pause ends.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, float] = {}

    def pause(self) -> None:
        self.peaks = self.read()

    def resume(self) -> None:
        self.reset()

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
        return {key: max(value, self.peaks.get(key, 0.0)) for key, value in self._current().items()}

    def _current(self) -> dict[str, float]:
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


def profile(call: Callable[[], Any], components: dict[str, torch.nn.Module], device: torch.device,
            images: int = 1) -> Stages:
    """Time one call stage by stage with synchronizing forward hooks on the sampler's components.

    Text encoding and decoding are the summed durations of those modules' forwards; the denoising
    loop runs from the first UNet call's start to the last one's end (scheduler steps included);
    step ``i`` lasts from UNet call ``i``'s start to call ``i+1``'s start (the last one to its end).

    The same hooks keep the UNet's and the decoder's outputs, which are checked for NaN and inf (of the
    call's ``images``) once the call has returned, so the check adds nothing to the stage times.
    """
    durations: dict[str, float] = {"text_encoder": 0.0, "decoder": 0.0}
    starts: dict[str, float] = {}
    unet_starts: list[float] = []
    unet_ends: list[float] = []
    batch_sizes: list[int] = []
    unet_outputs: list[torch.Tensor | None] = []
    decoded: list[torch.Tensor | None] = []
    handles = []

    def stamp() -> float:
        synchronize(device)
        return time.perf_counter()

    for role in ("text_encoder", "decoder"):
        module = components.get(role)
        if module is None:
            continue

        def before(_module: torch.nn.Module, _args: tuple[Any, ...], _role: str = role) -> None:
            starts[_role] = stamp()

        def after(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any, _role: str = role) -> None:
            durations[_role] += stamp() - starts[_role]
            if _role == "decoder":
                decoded.append(_output_tensor(output))

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    denoiser = components.get("denoiser")
    if denoiser is not None:

        def unet_before(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sample: torch.Tensor = args[0] if args else kwargs["sample"]
            batch_sizes.append(int(sample.shape[0]))
            unet_starts.append(stamp())

        def unet_after(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            unet_ends.append(stamp())
            unet_outputs.append(_output_tensor(output))

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
    return Stages(
        total_s=total_s,
        text_encode_s=durations["text_encoder"],
        denoise_s=(unet_ends[-1] - unet_starts[0]) if unet_starts else 0.0,
        decode_s=durations["decoder"],
        per_step_s=per_step,
        unet_batch_sizes=batch_sizes,
        unet_calls=len(batch_sizes),
        nonfinite_unet_calls=sum(1 for output in unet_outputs if output is not None and not _finite_rows(output).all()),
        nonfinite_images=_nonfinite_images([output for output in decoded if output is not None], images),
    )


def _output_tensor(output: Any) -> torch.Tensor | None:
    """What a module returned, as one tensor: itself, the first of a tuple (diffusers' ``return_dict=False``)
    or its ``.sample``; None for anything else, which is then not checked."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    output = getattr(output, "sample", output)
    return output.detach() if isinstance(output, torch.Tensor) else None


def _finite_rows(output: torch.Tensor) -> torch.Tensor:
    """Per item of the batch (the first dimension): whether all its values are finite."""
    return torch.isfinite(output.flatten(1) if output.dim() > 1 else output.reshape(1, -1)).all(dim=1)


def _nonfinite_images(outputs: Sequence[torch.Tensor], images: int) -> int:
    """How many of the call's ``images`` the decoder gave NaN or inf in, from its outputs in call order.

    The decoder sees the whole batch at once, or with ``--vae-tiling`` the batch tile by tile: then row r of
    every output is image r. With ``--vae-slicing`` it sees one image at a time (tile by tile with tiling
    too): then the rows, in order, fall into equal runs, one per image.
    """
    per_output = [_finite_rows(output).tolist() for output in outputs]
    rows = [finite for flags in per_output for finite in flags]
    whole_batches = all(len(flags) == images for flags in per_output)
    bad = {index % images if whole_batches else index * images // len(rows)
           for index, finite in enumerate(rows) if not finite}
    return len(bad)
