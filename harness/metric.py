"""What a metric plugin implements: a quality number for a measurement's images, never timed.

Metrics run after a measurement's timed calls and write ``record["metrics"][name]``; they never run
inside the timing protocol, so they cannot distort a sampler's seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import click
import torch


@dataclass(frozen=True)
class MetricInput:
    """A measurement's images with what produced them; ``references[i]`` is the baseline's image ``i``."""

    images: Sequence[Any]  # PIL images, in file-name order
    prompts: Sequence[str]  # the prompt of each image
    references: Sequence[Any] | None = None  # the baseline's images for the same prompts and seeds, if any


@dataclass(frozen=True)
class MetricConfig:
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)


class Metric:
    """Base class of metric plugins.

    Subclasses set ``name``, ``description`` and ``higher_is_better``, may add click ``options``, and
    implement :meth:`score`, which returns at least ``{"value": float}`` (plus any detail worth
    recording) or raises :class:`harness.errors.HarnessError` when it cannot score these images.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: Compares against reference images (the baseline's); skipped for the baseline itself.
    needs_reference: ClassVar[bool] = False
    options: ClassVar[list[click.Option]] = []

    def __init__(self, config: MetricConfig):
        self.config = config

    def score(self, data: MetricInput) -> dict[str, Any]:
        raise NotImplementedError
