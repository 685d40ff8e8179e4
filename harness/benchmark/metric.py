"""What a metric plugin implements: a quality number for a measurement's images, never timed.

Metrics run after a measurement's timed calls and write ``record["metrics"][name]``; they never run
inside the timing protocol, so they cannot distort a sampler's seconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import harness.options
from harness.options import Options


@dataclass(frozen=True)
class MetricInput:
    """A measurement's images with what produced them; ``references[i]`` is the baseline's image ``i``."""

    images: Sequence[Any]  # PIL images, in file-name order
    prompts: Sequence[str]  # the prompt of each image
    references: Sequence[Any] | None = None  # the baseline's images for the same prompts and seeds, if any


@dataclass(frozen=True)
class MetricConfig:
    device: torch.device


class Metric(ABC):
    """Base class of metric plugins.

    Subclasses set ``name``, ``description`` and ``higher_is_better``, may declare an ``Options`` dataclass
    (see :class:`harness.options.Options`; values arrive typed in ``self.options``), and implement
    :meth:`score`, which returns at least ``{"value": float}`` (plus any detail worth recording) or raises
    :class:`harness.errors.HarnessError` when it cannot score these images.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: Compares against reference images (the baseline's); skipped for the baseline itself.
    needs_reference: ClassVar[bool] = False
    #: The metric's own settings; harness bench makes one option per field.
    Options: ClassVar[type[Options]] = Options

    # ``harness.options.Options``: inside the class body, ``Options`` is the class attribute above.
    def __init__(self, config: MetricConfig, options: harness.options.Options | None = None) -> None:
        self.config = config
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def score(self, data: MetricInput) -> dict[str, Any]:
        """The quality of ``data.images``: at least ``{"value": float}``."""
