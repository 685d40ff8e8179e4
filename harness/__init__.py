"""harness: benchmark and distil few-step text-to-image diffusion samplers through plugins.

Everything a plugin, a script or a notebook may use is named here, in ``__all__``; the subpackages behind it
are free to change. Names load on first use, so ``import harness`` stays cheap (the command line handles
signals before torch is imported).

- run: :func:`bench`, :func:`train` (:class:`TrainResult`), the Python API of ``harness bench`` / ``train``;
- plugins: :data:`hookimpl`; the bases :class:`Sampler` (and :class:`DiffusersSampler`,
  :class:`FewStepLoraSampler`, :class:`PresetLoraSampler`), :class:`Metric`, :class:`Trainer` (and
  :class:`LatentDiffusionTrainer`, :class:`LoraTrainer`), with what they receive and their helpers;
- settings: :class:`Options`, :func:`setting`, :class:`TrainConfig`;
- errors: :class:`HarnessError`, :class:`ExitCode`, :func:`one_line`;
- results: :class:`Record` and its parts, :func:`read_records`, :func:`successful`;
- the embedded lab's own API: the subpackage :mod:`harness.lab`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from harness.version import __version__

# Each public name and the module that defines it.
_PUBLIC = {
    "bench": "harness.api", "train": "harness.api", "TrainResult": "harness.api",
    "hookimpl": "harness.hooks.specs",
    "HarnessError": "harness.errors", "ExitCode": "harness.errors", "one_line": "harness.errors",
    "Options": "harness.options", "setting": "harness.options",
    "Sampler": "harness.benchmark.sampler", "SamplerConfig": "harness.benchmark.sampler",
    "SamplerInfo": "harness.benchmark.sampler", "GenerationRequest": "harness.benchmark.sampler",
    "DiffusersSampler": "harness.benchmark.sampler", "FewStepLoraSampler": "harness.benchmark.sampler",
    "PresetLoraSampler": "harness.benchmark.lora_presets", "PresetOptions": "harness.benchmark.lora_presets",
    "Metric": "harness.benchmark.metric", "MetricConfig": "harness.benchmark.metric",
    "MetricInput": "harness.benchmark.metric", "PerImageMetric": "harness.benchmark.metric",
    "Trainer": "harness.training.trainer", "StepReport": "harness.training.state",
    "TrainConfig": "harness.training.config",
    "LatentDiffusionTrainer": "harness.training.diffusion", "NoiseSchedule": "harness.training.diffusion",
    "CLEAN": "harness.training.diffusion", "EncodedDataset": "harness.training.diffusion",
    "LoraTrainer": "harness.training.lora", "LoraTrainConfig": "harness.training.lora",
    "lora_distance": "harness.training.lora",
    "FINAL": "harness.training.checkpoints", "EMA": "harness.training.ema",
    "find_examples": "harness.training.data", "centre_crop": "harness.training.data",
    "to_pixels": "harness.training.data",
    "LoraSource": "harness.models.loading", "resolve_lora": "harness.models.loading",
    "few_step_scheduler": "harness.models.loading", "build_tokenizer": "harness.models.embedded",
    "SHIPPED_MODEL": "harness.models.embedded", "SHIPPED_LORA": "harness.models.embedded",
    "Record": "harness.records.schema", "Measured": "harness.records.schema",
    "successful": "harness.records.schema", "successful_baselines": "harness.records.schema",
    "read_records": "harness.records.store", "RECORDS_FILE": "harness.records.store",
    "write_folder_atomic": "harness.records.files",
    "TrainingRun": "harness.records.training_run", "json_objects": "harness.records.training_run",
    "comparison_grid": "harness.reporting.grids",
}
# Public names that are another name in their module.
_RENAMED = {"lora_distance": "distance"}

__all__ = [  # what plugins, scripts and notebooks may use; tests/test_api.py checks every name resolves
    "EMA", "SHIPPED_LORA", "SHIPPED_MODEL", "TrainingRun", "json_objects",
    "CLEAN", "DiffusersSampler", "EncodedDataset", "ExitCode", "FINAL", "FewStepLoraSampler", "GenerationRequest",
    "HarnessError", "LatentDiffusionTrainer", "LoraSource", "LoraTrainConfig", "LoraTrainer", "Measured", "Metric",
    "MetricConfig", "MetricInput", "NoiseSchedule", "Options", "PerImageMetric", "PresetLoraSampler", "PresetOptions",
    "RECORDS_FILE", "Record", "Sampler", "SamplerConfig", "SamplerInfo", "StepReport", "TrainConfig", "TrainResult",
    "Trainer", "__version__", "bench", "build_tokenizer", "centre_crop", "comparison_grid", "few_step_scheduler",
    "find_examples", "hookimpl", "lab", "lora_distance", "one_line", "read_records", "resolve_lora", "setting",
    "successful", "successful_baselines", "to_pixels", "train", "write_folder_atomic",
]


def __getattr__(name: str) -> Any:
    if name == "lab":
        return importlib.import_module("harness.lab")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from harness import lab
    from harness.api import TrainResult, bench, train
    from harness.benchmark.lora_presets import PresetLoraSampler, PresetOptions
    from harness.benchmark.metric import Metric, MetricConfig, MetricInput, PerImageMetric
    from harness.benchmark.sampler import (
        DiffusersSampler,
        FewStepLoraSampler,
        GenerationRequest,
        Sampler,
        SamplerConfig,
        SamplerInfo,
    )
    from harness.errors import ExitCode, HarnessError, one_line
    from harness.hooks.specs import hookimpl
    from harness.models.embedded import SHIPPED_LORA, SHIPPED_MODEL, build_tokenizer
    from harness.models.loading import LoraSource, few_step_scheduler, resolve_lora
    from harness.options import Options, setting
    from harness.records.files import write_folder_atomic
    from harness.records.schema import Measured, Record, successful, successful_baselines
    from harness.records.store import RECORDS_FILE, read_records
    from harness.records.training_run import TrainingRun, json_objects
    from harness.reporting.grids import comparison_grid
    from harness.training.checkpoints import FINAL
    from harness.training.config import TrainConfig
    from harness.training.data import centre_crop, find_examples, to_pixels
    from harness.training.diffusion import CLEAN, EncodedDataset, LatentDiffusionTrainer, NoiseSchedule
    from harness.training.ema import EMA
    from harness.training.lora import LoraTrainConfig, LoraTrainer
    from harness.training.lora import distance as lora_distance
    from harness.training.state import StepReport
    from harness.training.trainer import Trainer
