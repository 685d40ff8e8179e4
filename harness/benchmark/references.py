"""What set metrics compare with besides the run's baseline, and what they leave for later runs.

- ``--reference DIR``: a folder of pictures (PNG, JPEG or WebP) of the run's size, streamed through every set
  metric once, before the first sampler loads;
- ``--reference_stats METRIC=FILE.npz``: a statistics file in pytorch-fid's format (``mu``, ``sigma``; a kernel
  metric such as ``kid`` or ``cmmd`` also needs ``features``), e.g. published COCO statistics;
- ``--save_stats DIR``: that file for every set metric, sampler and step count, so a later run can use it
  (and ``METRIC_reference.npz``, the statistics of ``--reference DIR``).

Every check happens when the run is built, before its folder exists: a bad reference leaves nothing behind.
Files are read with ``allow_pickle=False``: a statistics file is numbers, never code.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from harness.benchmark.measure import METRIC_BATCH
from harness.benchmark.metric import Metric, MetricInput
from harness.errors import HarnessError, one_line
from harness.records import files

if TYPE_CHECKING:
    from harness.benchmark.plan import Task
    from harness.benchmark.spec import BenchSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def stats_file_name(metric: str, sampler: str, steps: int) -> str:
    """``fid_flash-lcm_4steps.npz``: the metric, the sampler and the step count the statistics describe."""
    return f"{metric}_{re.sub(r'[^A-Za-z0-9_.-]', '_', sampler)}_{steps}steps.npz"


def read_statistics(path: Path, option: str) -> dict[str, np.ndarray]:
    """A statistics file's arrays, checked: ``mu`` (D,), ``sigma`` (D, D), optional ``features`` (N, D), all finite."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise HarnessError(f"{option}: '{path}' is not a .npz file (a zip of numpy arrays); pass pytorch-fid's "
                           "format (arrays mu and sigma) or a file written by harness bench --save_stats.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except FileNotFoundError:
        raise HarnessError(f"{option}: '{path}' does not exist; pass a .npz statistics file (pytorch-fid's format, "
                           "or one written by harness bench --save_stats).") from None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise HarnessError(f"{option}: '{path}' is not a readable .npz file ({error}); pass pytorch-fid's format "
                           "(arrays mu and sigma) or a file written by harness bench --save_stats.") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise HarnessError(f"{option}: '{path}' holds {sorted(arrays) or 'no arrays'}, not mu and sigma; pass "
                           "pytorch-fid's format or a file written by harness bench --save_stats.")
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise HarnessError(f"{option}: '{path}' has mu of shape {mu.shape} and sigma of shape {sigma.shape}; mu is "
                           "(D,) and sigma (D, D) for D features.")
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise HarnessError(f"{option}: '{path}' has features of shape {features.shape} beside mu of shape "
                           f"{mu.shape}; they are (N, D) for D features.")
    for name, array in arrays.items():
        if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
            raise HarnessError(f"{option}: '{path}' has NaN or infinite values in {name}; recompute the statistics.")
    return {name: arrays[name].astype(np.float64) for name in ("mu", "sigma", "features") if name in arrays}


class ReferenceSets:
    """The reference of each set metric that does not compare with the baseline, checked when the run is built."""

    def __init__(self, spec: BenchSpec, metrics: Mapping[str, Metric], size: tuple[int, int] | None):
        self.spec = spec
        self.statistics: dict[str, tuple[str, dict[str, np.ndarray]]] = {}  # metric -> (label, arrays)
        self.folder: list[Path] = []
        set_metrics = [name for name, metric in metrics.items() if metric.reference_set]
        for name, path in spec.reference_stats.items():
            self._check_stats(name, Path(path), metrics)
        if spec.reference is not None:
            if not set_metrics:
                raise HarnessError("--reference is what set metrics compare with; add one, e.g. --metric fid "
                                   "(or fd-lab on the embedded model).")
            self.folder = _reference_pictures(Path(spec.reference), size)
        if spec.save_stats is not None:
            if not set_metrics:
                raise HarnessError("--save_stats writes the statistics of set metrics; add one, e.g. --metric fid "
                                   "(or fd-lab on the embedded model).")
            _check_writable_folder(Path(spec.save_stats))

    def _check_stats(self, name: str, path: Path, metrics: Mapping[str, Metric]) -> None:
        option = f"--reference_stats {name}={path}"
        metric = metrics.get(name)
        if metric is None or not metric.reference_set:
            asked = [n for n, m in metrics.items() if m.reference_set]
            raise HarnessError(f"{option}: '{name}' is not a set metric of this run (its set metrics: "
                               f"{', '.join(asked) or 'none'}); add --metric {name} or name one of them.")
        arrays = read_statistics(path, option)
        size = arrays["mu"].shape[0]
        if metric.dimensions is not None and size != metric.dimensions:
            raise HarnessError(f"{option}: the file describes {size} features, {name} computes "
                               f"{metric.dimensions}; pass statistics written for {name} (harness bench "
                               "--save_stats writes them).")
        if metric.needs_features and "features" not in arrays:
            raise HarnessError(f"{option}: {name} compares features, not a mean and covariance, and the file has "
                               "none; pass a file written by harness bench --save_stats for it.")
        self.statistics[name] = (f"statistics '{path}'", arrays)

    def label(self, metric: str) -> str | None:
        """What ``metric`` compares with instead of the baseline, as its records name it; None: the baseline."""
        if metric in self.statistics:
            return self.statistics[metric][0]
        return self._folder_label if self.folder else None

    @property
    def _folder_label(self) -> str:
        return f"folder '{self.spec.reference}' ({len(self.folder)} pictures)"

    def read(self, metrics: Mapping[str, Metric]) -> dict[str, str]:
        """Rank 0, before the first sampler: each set metric takes its reference. Returns the one-line error of
        each metric that could not (its weights missing, say): it scores nothing, and the others still run."""
        failures: dict[str, str] = {}
        from_folder: dict[str, Metric] = {}
        for name, metric in metrics.items():
            if not metric.reference_set:
                continue
            if name in self.statistics:
                label, arrays = self.statistics[name]
                metric.use_reference_statistics(arrays, label)
            elif self.folder:
                metric.reset()
                from_folder[name] = metric
        for start in range(0, len(self.folder), METRIC_BATCH):
            paths = self.folder[start:start + METRIC_BATCH]
            batch = MetricInput([_open(path) for path in paths], [""] * len(paths),
                                indices=range(start, start + len(paths)))
            for name, metric in list(from_folder.items()):
                try:
                    metric.update(batch)
                except Exception as error:  # noqa: BLE001 - a failing metric must not stop the run
                    failures[name] = f"cannot read the --reference pictures: {one_line(error)}"
                    del from_folder[name]
        for name, metric in from_folder.items():
            try:
                metric.use_as_reference(self._folder_label)
            except Exception as error:  # noqa: BLE001 - a failing metric must not stop the run
                failures[name] = f"cannot read the --reference pictures: {one_line(error)}"
                continue
            if self.spec.save_stats is not None:  # a later run can use the folder's statistics instead of it
                self._write(name, "reference", metric.statistics())
        return failures

    def save_stats(self, scored: Mapping[str, Metric], results: Mapping[str, Mapping[str, Any]],
                   task: Task) -> list[str]:
        """``--save_stats``: the statistics of ``task``'s pictures of each set metric that saw them all (``scored``:
        the metrics that scored the measurement; ``results``: what they recorded). Returns what could not be
        written, one line each: the measurement and its record stand."""
        problems = []
        for name, metric in scored.items():
            if not metric.reference_set or "error" in results.get(name, {"error": "not scored"}):
                continue
            file_name = stats_file_name(name, task.sampler, task.steps)
            try:
                self._write(name, file_name, metric.statistics())
            except Exception as error:  # noqa: BLE001 - a statistics file must not undo a measurement
                problems.append(f"--save_stats: {file_name} was not written: {one_line(error).rstrip('.')}; "
                                "check the folder (space, permissions).")
        return problems

    def _write(self, metric: str, name: str, arrays: dict[str, np.ndarray]) -> None:
        assert self.spec.save_stats is not None
        folder = Path(self.spec.save_stats)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (name if name.endswith(".npz") else f"{metric}_{name}.npz")
        with files.atomic_path(path) as temp:
            with temp.open("wb") as handle:  # a file object: np.savez would add .npz to a name
                save: Any = np.savez  # numpy's stubs type every keyword as allow_pickle
                save(handle, **arrays)


def _check_writable_folder(folder: Path) -> None:
    """--save_stats: a folder harness can make and write into (made now, before the run folder)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".harness-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise HarnessError(f"--save_stats '{folder}' is not a folder harness can write to ({error.strerror or error}); "
                           "pass another folder.") from None


def _reference_pictures(folder: Path, size: tuple[int, int] | None) -> list[Path]:
    """The pictures of ``--reference``, checked: two or more, one size, the run's (height, width) where known."""
    if not folder.is_dir():
        raise HarnessError(f"--reference '{folder}' is not a folder; pass a folder of PNG, JPEG or WebP pictures.")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if len(paths) < 2:
        raise HarnessError(f"--reference '{folder}' holds {len(paths)} picture(s) (PNG, JPEG or WebP); a set metric "
                           "needs at least 2.")
    first = None
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, UnidentifiedImageError) as error:
            raise HarnessError(f"--reference: '{path}' is not a readable picture ({error}); remove it or replace "
                               "it.") from None
        wanted = size or first
        if wanted is not None and (height, width) != wanted:
            raise HarnessError(f"--reference: '{path.name}' is {width}x{height}, the run's pictures are "
                               f"{wanted[1]}x{wanted[0]}; resize the reference set to that size (centre crop, "
                               "then resize, as the papers do) or pass --height and --width to match it.")
        first = first or (height, width)
    return paths


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        converted: Image.Image = image.convert("RGB")
    return converted
