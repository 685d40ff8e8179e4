"""One process's share of a measurement under the timing protocol (:func:`measure_share`), and what happens to
its images as they are made: the quality metrics (:class:`Scoring`) and the baseline's images kept for
metrics that compare image by image (:class:`ReferenceImages`), all outside the timed region."""

from __future__ import annotations

import hashlib
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from harness.benchmark import distributed, timing
from harness.benchmark.metric import Metric, MetricInput
from harness.benchmark.plan import Task
from harness.benchmark.sampler import GenerationRequest, Sampler
from harness.errors import HarnessError, one_line
from harness.records.schema import Stages

# Images handed to the metrics at once: large enough to batch a feature network, small enough that a
# measurement holds a bounded number of images whatever its number of prompts.
METRIC_BATCH = 32


@dataclass
class Share:
    """What one rank measured of one task: its timing, and what it sends rank 0 of its images."""

    rank: int
    host: str
    device: str
    calls: int
    load_s: float
    image_count: int  # images this rank made in a measured pass
    warnings: list[tuple[int, str]]  # (call index, warning) from the sampler's check of each call
    deterministic: bool
    measurement: timing.Measurement
    profile: Stages
    images: dict[int, Any] = field(default_factory=dict)  # index -> image, for rank 0 to write (other ranks)
    metric_states: dict[str, Any] = field(default_factory=dict)  # Scoring.states(): never the images


def measure_share(
    sampler: Sampler,
    requests: Sequence[GenerationRequest],
    load_s: float,
    device: torch.device,
    settings: timing.TimingSettings,
    world: distributed.World,
    consume: Callable[[MetricInput], None] = lambda _: None,
) -> Share:
    """The timing protocol over this rank's round-robin share of the calls (all of them with one process).

    The first measured pass's images go to ``consume`` in batches of up to ``METRIC_BATCH``, between the
    timed calls; every pass's images are hashed (are the passes the same pictures?) and dropped.
    """
    mine = distributed.shard(list(enumerate(requests)), world)
    warnings = [(number, warning) for number, request in mine for warning in sampler.check(request)]
    calls = [partial(sampler.generate, request) for _, request in mine]
    per_call = requests[0].num_images
    digests: dict[int, Any] = {}
    pending: list[tuple[int, Any, str, int]] = []  # (index, image, prompt, seed)

    def on_output(number: int, call: int, output: Sequence[Any]) -> None:
        digest = digests.setdefault(number, hashlib.sha256())
        for image in output:
            digest.update(image.tobytes())
        if number:
            return
        position, request = mine[call]
        pending.extend((position * per_call + i, image, request.prompt, request.seeds[i])
                       for i, image in enumerate(output))
        while len(pending) >= METRIC_BATCH or pending and call == len(calls) - 1:
            indices, images, prompts, seeds = zip(*pending[:METRIC_BATCH])
            del pending[:METRIC_BATCH]
            consume(MetricInput(images, prompts, indices=indices, seeds=seeds))

    measurement = timing.measure(calls, device, settings, on_output)
    stage_profile = timing.profile(calls[0], sampler.components(), device, per_call)
    problem = nonfinite_problem(stage_profile, per_call)
    if problem is not None:
        if stage_profile.nonfinite_images == per_call:
            raise HarnessError(problem)  # every image is blank: no figure of this measurement means anything
        warnings.append((mine[0][0], problem))
    return Share(
        world.rank,
        platform.node(),
        str(device),
        len(calls),
        load_s,
        len(calls) * per_call,
        warnings,
        len({digest.hexdigest() for digest in digests.values()}) == 1,
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


class ReferenceImages:
    """The first baseline's images of this process, for metrics that compare image by image (``needs_reference``).

    Written to a private temporary folder as they are made and read back by index, so a measurement of any
    size holds none of them in memory. Each process keeps its own: its share of a later measurement has the
    same indices as its share of the baseline.
    """

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self.failure: str | None = None  # why they could not be kept

    def add(self, batch: MetricInput) -> None:
        try:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="harness-reference-")
            for index, image in zip(batch.positions, batch.images):
                image.save(Path(self._folder.name) / f"{index}.png")
        except OSError as error:  # the comparisons fail, one line each; the baseline's measurement stands
            self.failure = f"{one_line(error).rstrip('.')} (in {tempfile.gettempdir()}; set TMPDIR to a roomier folder)"

    def get(self, indices: Sequence[int]) -> list[Any]:
        if self.failure is not None or self._folder is None:
            raise HarnessError(f"the baseline's pictures could not be kept to compare with: {self.failure}.")
        images = []
        for index in indices:
            with Image.open(Path(self._folder.name) / f"{index}.png") as image:
                images.append(image.copy())
        return images

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


NO_REFERENCE_SET = ("no reference to compare with: add --compare_baseline (the baseline's pictures), --reference DIR "
                    "(a folder of pictures) or --reference_stats METRIC=FILE.npz")


class Scoring:
    """Every requested metric over one measurement at a time: each process updates the metrics with its images as
    they are made; rank 0 merges the other processes' states and computes. A metric that cannot score says why in
    the record, and the timing stands."""

    def __init__(self, metrics: Mapping[str, Metric], random_weights_note: str | None,
                 on_warning: Callable[[str], None], external_reference: Callable[[str], str | None]):
        self.metrics = metrics
        self.random_weights_note = random_weights_note
        self.on_warning = on_warning
        self.external_reference = external_reference  # a metric's --reference / --reference_stats label, if any
        self.reference_images = ReferenceImages()
        # The first baseline, once its record is in (commit_reference), and the set metrics that took its pictures.
        self.reference_label: str | None = None
        self.reference_sets: set[str] = set()
        self._taken: set[str] = set()  # set metrics that took this measurement's pictures, until committed
        self.active: dict[str, Metric] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.seconds: dict[str, float] = {}
        self.becomes_reference = False
        self.broken: dict[str, str] = {}  # metric -> why it cannot score in this run (rank 0 knows)

    @property
    def wants_reference_images(self) -> bool:
        return self.random_weights_note is None and any(m.needs_reference for m in self.metrics.values())

    def start(self, task: Task, first_baseline: bool, run_has_baseline: bool) -> None:
        """Decide which metrics score ``task`` (the same on every process) and reset them."""
        self.active, self.results, self.seconds = {}, {}, {}
        self.becomes_reference = task.baseline and first_baseline
        for name, metric in self.metrics.items():
            if name in self.broken:
                self.results[name] = {"error": self.broken[name]}
                continue
            skipped = self._skipped(metric, task, run_has_baseline)
            if skipped is not None:
                self.results[name] = {"skipped": skipped}
                continue
            metric.reset()
            self.active[name] = metric
            self.seconds[name] = 0.0

    def _skipped(self, metric: Metric, task: Task, run_has_baseline: bool) -> str | None:
        if self.random_weights_note is not None:
            return f"{self.random_weights_note}: quality metrics mean nothing here"
        if metric.needs_reference:
            if task.baseline:
                return "this measurement is the reference"
            if not run_has_baseline:
                return "no baseline in this run to compare with: add --compare_baseline"
        if metric.reference_set and self.external_reference(metric.name) is None:
            if not run_has_baseline:
                return NO_REFERENCE_SET
            if task.baseline and not self.becomes_reference:
                return "this measurement is the reference"
        return None

    def update(self, batch: MetricInput, task: Task) -> None:
        """One batch of this process's images through every active metric; a failing metric drops out."""
        if task.baseline and self.becomes_reference and self.wants_reference_images:
            self.reference_images.add(batch)
        aligned = None
        for name, metric in list(self.active.items()):
            start = time.perf_counter()
            try:
                if metric.needs_reference:
                    if aligned is None:
                        aligned = MetricInput(batch.images, batch.prompts, self.reference_images.get(batch.positions),
                                              batch.indices, batch.seeds)
                    metric.update(aligned)
                else:
                    metric.update(batch)
            except Exception as error:  # noqa: BLE001 - a failing metric must not lose the timing
                self.results[name] = {"error": one_line(error)}
                del self.active[name]
            self.seconds[name] += time.perf_counter() - start

    def states(self) -> dict[str, Any]:
        """What rank 0 needs of this process: each active metric's state and seconds, or its error."""
        states: dict[str, Any] = {}
        for name in self.metrics:
            if name in self.active:
                try:
                    states[name] = ("state", self.active[name].state(), self.seconds[name])
                except Exception as error:  # noqa: BLE001 - a failing metric must not lose the timing
                    states[name] = ("error", one_line(error), 0.0)
            elif "error" in self.results.get(name, {}):
                states[name] = ("error", self.results[name]["error"], 0.0)
        return states

    def finish(self, task: Task, others: Sequence[dict[str, Any]], succeeded: bool) -> dict[str, dict[str, Any]]:
        """Rank 0: every process's states merged, then each metric's result (``others``: the other ranks' states).

        Nothing is computed for a measurement that failed (``succeeded`` False); its record holds the error.
        """
        label = f"{task.sampler} {task.steps} steps"
        results = dict(self.results)
        self._taken = set()
        for name in self.seconds:  # every metric started, failed or not: without its reference, it is skipped
            missing = self._missing_reference(name)
            if missing is not None:
                results[name] = {"skipped": missing}
                self.active.pop(name, None)
        for name, metric in self.active.items() if succeeded else ():
            failure = next((state[1] for states in others for state in [states.get(name)]
                            if state is not None and state[0] == "error"), None)
            if failure is not None:
                results[name] = {"error": failure}
                continue
            start = time.perf_counter()
            results[name] = self._computed(name, metric, [states[name][1] for states in others if name in states],
                                           label)
            if "value" in results[name]:
                seconds = self.seconds[name] + sum(states[name][2] for states in others if name in states)
                results[name]["metric_s"] = seconds + time.perf_counter() - start
        for name, result in results.items() if succeeded else ():  # a failed measurement's record says why
            if "error" in result and name not in self.broken:  # the broken ones were named when the run started
                self.on_warning(f"metric {name} on {label}: {result['error']}")
        return {name: results[name] for name in self.metrics if name in results}

    def commit_reference(self, task: Task) -> None:
        """Rank 0, once the first baseline's record is written: later measurements compare with it."""
        if self.becomes_reference:
            self.reference_label = f"{task.sampler} {task.steps} steps"
            self.reference_sets = self._taken

    def _missing_reference(self, name: str) -> str | None:
        """Why metric ``name`` has nothing to compare with (its baseline failed), or None."""
        metric = self.metrics[name]
        if self.becomes_reference or not (metric.needs_reference or metric.reference_set
                                          and self.external_reference(name) is None):
            return None
        if self.reference_label is None:
            return "the baseline to compare with failed; see its record"
        if metric.reference_set and name not in self.reference_sets:
            return f"{name} failed on the baseline's pictures; see the baseline's record"
        return None

    def _computed(self, name: str, metric: Metric, states: list[Any], label: str) -> dict[str, Any]:
        try:
            metric.merge(states)
            if metric.reference_set and self.becomes_reference and self.external_reference(name) is None:
                metric.use_as_reference(label)
                self._taken.add(name)
                return {"skipped": "this measurement is the reference"}
            result = metric.compute()
        except Exception as error:  # noqa: BLE001 - a failing metric must not lose the timing
            return {"error": one_line(error)}
        if metric.needs_reference:
            result["reference"] = self.reference_label
        elif metric.reference_set:
            result["reference"] = self.external_reference(name) or self.reference_label
        return {**result, "higher_is_better": metric.higher_is_better}

    def close(self) -> None:
        self.reference_images.close()
