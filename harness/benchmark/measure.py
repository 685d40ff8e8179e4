"""One process's share of a measurement under the timing protocol, and the quality metrics of its images
(:class:`Scorer`), scored outside the timed region."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from harness.benchmark import distributed, timing
from harness.benchmark.metric import Metric, MetricInput
from harness.benchmark.sampler import GenerationRequest, Sampler
from harness.errors import HarnessError, one_line
from harness.records.schema import Stages

if TYPE_CHECKING:
    pass

from harness.benchmark.plan import Task


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


def _digest(images: Any) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()
