"""What a metric plugin implements: a quality number for a measurement's images, never timed.

Images stream through a metric batch by batch as a measurement makes them (the shape of torchmetrics'
``Metric``): :meth:`Metric.reset` when a measurement starts, :meth:`Metric.update` for each batch,
then, on rank 0, :meth:`Metric.merge` folds in the :meth:`Metric.state` of every other process and
:meth:`Metric.compute` writes ``record["metrics"][name]``. The batches are handed over between timed calls,
outside the timed brackets and the peak-memory readings, so a metric cannot distort a sampler's figures; the
images are dropped (or written, with ``--save_images``) once every metric has seen them.

Three ways to write one, from the simplest:

- override :meth:`Metric.score` alone: harness keeps the measurement's images and calls it once with all of
  them (memory grows with the number of images: fine for a few hundred);
- subclass :class:`PerImageMetric`: a value per image, kept as numbers (``psnr``, ``clip-score``);
- override ``reset``/``update``/``state``/``merge``/``compute``: a state that stays small however many images
  pass (``SetMetric``'s features statistics for ``fid``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

import harness.options
from harness.options import Options


@dataclass(frozen=True)
class MetricInput:
    """A batch of a measurement's images with what produced them.

    ``indices[i]`` is image ``i``'s place in the whole measurement (file-name order: prompt by prompt,
    ``--num_images`` per prompt), ``seeds[i]`` the seed it was drawn from, and ``references[i]`` the
    baseline's image of the same prompt and seed, for a metric with ``needs_reference``.
    """

    images: Sequence[Any]  # PIL images
    prompts: Sequence[str]  # the prompt of each image
    references: Sequence[Any] | None = None  # the baseline's images for the same prompts and seeds, if any
    indices: Sequence[int] | None = None  # None: 0, 1, 2, ... (a whole measurement given at once)
    seeds: Sequence[int] | None = None

    @property
    def positions(self) -> list[int]:
        """Each image's index in the measurement."""
        return list(self.indices) if self.indices is not None else list(range(len(self.images)))


def joined(batches: Sequence[MetricInput]) -> MetricInput:
    """The batches as one input, in measurement order (they may arrive interleaved from several processes)."""
    rows = sorted((index, batch, i) for batch in batches for i, index in enumerate(batch.positions))

    def column(name: str) -> list[Any] | None:
        if any(getattr(batch, name) is None for batch in batches):
            return None
        return [getattr(batch, name)[i] for _, batch, i in rows]

    return MetricInput(images=[batch.images[i] for _, batch, i in rows],
                       prompts=[batch.prompts[i] for _, batch, i in rows],
                       references=column("references") if batches else None,
                       indices=[index for index, _, _ in rows],
                       seeds=column("seeds") if batches else None)


@dataclass(frozen=True)
class MetricConfig:
    device: torch.device


class Metric:
    """Base class of metric plugins.

    Subclasses set ``name``, ``description`` and ``higher_is_better``, may declare an ``Options`` dataclass
    (see :class:`harness.options.Options`; values arrive typed in ``self.options``), and either implement
    :meth:`score` (all images at once) or stream: ``reset``, ``update``, ``state``, ``merge`` and ``compute``.
    The result is at least ``{"value": float}`` (plus any detail worth recording); a metric raises
    :class:`harness.errors.HarnessError` when it cannot score these images.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: Compares each image with the baseline's image of the same prompt and seed (``references``); skipped for
    #: the baseline itself and in runs without one.
    needs_reference: ClassVar[bool] = False
    #: Compares the measurement's set of images with a reference set (the baseline's, ``--reference DIR`` or
    #: ``--reference_stats``) through :meth:`use_as_reference`; see ``harness_plugins.set_metrics.SetMetric``.
    reference_set: ClassVar[bool] = False
    #: A set metric's number of features when known before it loads (``--reference_stats`` files are checked
    #: against it before the run starts); None: known once its feature network has run.
    dimensions: ClassVar[int | None] = None
    #: A set metric that compares features themselves (a kernel MMD), so its statistics files carry them.
    needs_features: ClassVar[bool] = False
    #: The metric's own settings; harness bench makes one option per field.
    Options: ClassVar[type[Options]] = Options

    # ``harness.options.Options``: inside the class body, ``Options`` is the class attribute above.
    def __init__(self, config: MetricConfig, options: harness.options.Options | None = None) -> None:
        self.config = config
        self.options = options if options is not None else self.Options()
        self._kept: list[MetricInput] = []

    def score(self, data: MetricInput) -> dict[str, Any]:
        """The quality of ``data.images``, all at once: at least ``{"value": float}``.

        A streaming metric gets this for free (``reset``, one ``update``, ``compute``): handy in tests.
        """
        self.reset()
        self.update(data)
        return self.compute()

    def reset(self) -> None:
        """Forget the last measurement's images: called when a measurement starts."""
        self._kept = []

    def update(self, batch: MetricInput) -> None:
        """Take a batch of the measurement's images. By default they are kept for :meth:`score`."""
        self._kept.append(batch)

    def state(self) -> Any:
        """What this process has seen since :meth:`reset`, to send to rank 0 (picklable, and small when it can)."""
        return self._kept

    def merge(self, states: Sequence[Any]) -> None:
        """Rank 0: fold in the :meth:`state` of every other process."""
        for kept in states:
            self._kept.extend(kept)

    def compute(self) -> dict[str, Any]:
        """The measurement's result, from every process's images: at least ``{"value": float}``."""
        if type(self).score is Metric.score:
            raise TypeError(f"metric {self.name!r} implements neither score() nor update() and compute()")
        kept, self._kept = self._kept, []
        return self.score(joined(kept))

    def use_as_reference(self, label: str) -> None:
        """A ``reference_set`` metric: the state seen since :meth:`reset` becomes the set later measurements
        are compared with (``label`` says which, in their records)."""
        raise NotImplementedError(f"metric {self.name!r} compares with no reference set")

    def use_reference_statistics(self, statistics: dict[str, Any], label: str) -> None:
        """A ``reference_set`` metric: compare with these statistics (``mu``, ``sigma``, maybe ``features``, as
        numpy arrays), read from a ``--reference_stats`` file."""
        raise NotImplementedError(f"metric {self.name!r} compares with no reference set")

    def statistics(self) -> dict[str, Any]:
        """A ``reference_set`` metric: the statistics of the pictures seen since :meth:`reset`, as numpy arrays
        (``mu``, ``sigma``; ``features`` when ``needs_features``), for ``--save_stats``."""
        raise NotImplementedError(f"metric {self.name!r} keeps no statistics")


class PerImageMetric(Metric):
    """A metric that scores each image alone: only the per-image values are kept, never the images.

    Subclasses implement :meth:`score_batch` (a picklable value per image, e.g. a float) and
    :meth:`summarize` (the record's entry, from every image's value in measurement order).
    """

    def __init__(self, config: MetricConfig, options: harness.options.Options | None = None) -> None:
        super().__init__(config, options)
        self._values: dict[int, tuple[str, Any]] = {}

    def reset(self) -> None:
        self._values = {}

    def update(self, batch: MetricInput) -> None:
        for index, prompt, value in zip(batch.positions, batch.prompts, self.score_batch(batch), strict=True):
            self._values[index] = (prompt, value)

    def state(self) -> dict[int, tuple[str, Any]]:
        return self._values

    def merge(self, states: Sequence[dict[int, tuple[str, Any]]]) -> None:
        for values in states:
            self._values.update(values)

    def compute(self) -> dict[str, Any]:
        ordered = [self._values[index] for index in sorted(self._values)]
        self._values = {}
        if not ordered:
            raise ValueError(f"metric {self.name!r} saw no image")
        return self.summarize([value for _, value in ordered], [prompt for prompt, _ in ordered])

    @abstractmethod
    def score_batch(self, batch: MetricInput) -> list[Any]:
        """One value per image of ``batch``, in its order."""

    @abstractmethod
    def summarize(self, values: list[Any], prompts: list[str]) -> dict[str, Any]:
        """The record's entry, at least ``{"value": float}``, from each image's value and prompt."""
