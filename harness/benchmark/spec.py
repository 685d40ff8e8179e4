"""What ``harness bench`` is asked: its options (:class:`BenchOptions`) and, resolved and checked, the run's
:class:`BenchSpec`, which no run changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.benchmark import timing
from harness.models.speed import SpeedOptions
from harness.options import Options, setting
from harness.records.schema import MAX_GUIDANCE, MAX_STEPS

if TYPE_CHECKING:
    pass


DTYPE_CHOICES = ("float16", "bfloat16", "float32", "fp16", "bf16", "fp32")
MAX_SEED = 2**64 - 1  # torch generators take seeds up to 2**64 - 1
SAVE_IMAGES = ("all", "grids", "none")
GRID_IMAGES = 32  # pictures --save_images grids keeps of each measurement: a comparison grid's widest row
AUTO_ALL_IMAGES = 1000  # pictures per measurement up to which --save_images defaults to all


@dataclass(frozen=True)
class BenchOptions(Options):
    """What ``harness bench`` (and ``harness eval``) are asked, one option per field.

    With :class:`harness.benchmark.timing.TimingSettings`, :class:`harness.models.speed.SpeedOptions` and the selected
    plugins' ``Options`` this is every option of the command and the only place their defaults live.
    """

    samplers: tuple[str, ...] = setting(("flash-lcm",), "Sampler(s) to run; several values after one flag or a "
                                                         "repeated flag.", flags=("--sampler", "-s"))
    prompt: str | None = setting(None, "Text prompt (default: a prompt suited to the model).")
    prompts_file: str | None = setting(
        None, "File of prompts (one per line, JSONL with a 'prompt' field, or a JSONL, CSV or Parquet file with a "
              "caption column), a built-in set: held-out (the embedded model's 64 evaluation prompts), seed (the "
              "demo's prompts), or a suite drawn from a Hugging Face data set: coco2014-5k, coco2017-5k, coco-30k, "
              "parti, drawbench.", flags=("--prompts",), metavar="FILE|SET|SUITE")
    prompt_column: str | None = setting(None, "Column of captions in a JSONL, CSV or Parquet --prompts file or a "
                                              "suite's data set (default: caption, captions, prompt, prompts, text "
                                              "or sentences, in any case).")
    prompt_seed: int = setting(0, "Seed that draws a suite's images and each image's caption (or --prompt_count "
                                  "prompts of a file); recorded in config.prompt_suite.", minimum=0)
    prompt_count: int | None = setting(None, "Draw this many prompts with --prompt_seed (default: the suite's "
                                             "size, e.g. 5000 for coco2017-5k; all of a file, in order).", minimum=1)
    prompt_source: str | None = setting(None, "Local copy of a suite's data set: a folder written by datasets' "
                                              "save_to_disk, or a JSONL, CSV or Parquet file (default: the Hugging "
                                              "Face cache, or the hub).")
    steps: tuple[int, ...] = setting((2, 4, 8), "Inference steps of the few-step samplers, e.g. --steps 2 4 8.",
                                     minimum=1, maximum=MAX_STEPS)
    seed: int | None = setting(None, "Random seed (0 to 2**64-1); also put into file names, as the seed demo does.",
                               minimum=0, maximum=MAX_SEED)
    outdir: str | None = setting(None, "Output folder (default: a new results/<UTC time>-<samplers>/).")
    num_images: int = setting(1, "Images per prompt and step setting.", minimum=1)
    compare_baseline: bool = setting(False, "Also run vanilla-sd and write comparison grids (baseline top, "
                                            "few-step bottom).")
    baseline_steps: int = setting(30, "Steps of baseline samplers.", minimum=1, maximum=MAX_STEPS)
    baseline_guidance: float = setting(7.5, "Guidance scale of baseline samplers.", minimum=0, maximum=MAX_GUIDANCE)
    baseline_outdir: str | None = setting(None, "Folder for baseline images (default: OUTDIR/baseline).")
    lora_path: str | None = setting(None, "Local LoRA folder or .safetensors file; takes precedence over --lora_id.")
    lora_id: str | None = setting(None, "Hub LoRA id (default: jasperai/flash-sd on SD 1.5, the shipped LoRA on "
                                        "embedded).")
    model: str | None = setting(None, "sd15, sd15-arch (random weights, timing only), embedded, a hub id or a "
                                      "diffusers folder (default: sd15 with CUDA, else embedded).")
    dtype: str | None = setting(None, "Default: float16 on CUDA, float32 elsewhere.", choices=DTYPE_CHOICES)
    device: str | None = setting(None, "cpu, cuda, cuda:N or mps (default: cuda when available).")
    height: int | None = setting(None, "Image height in pixels, a multiple of 8.", minimum=8)
    width: int | None = setting(None, "Image width in pixels, a multiple of 8.", minimum=8)
    metrics: tuple[str, ...] = setting((), "Quality metric(s) scored on every measurement's images, outside the "
                                           "timed region (several values or a repeated flag).", flags=("--metric",))
    batch: int | None = setting(None, "Images per pipeline call (default: all --num_images in one call).",
                                minimum=1)
    overwrite: bool = setting(False, "Replace the records of an earlier run in --outdir.")
    dry_run: bool = setting(False, "Print the plan as JSON and exit without loading models.")
    as_json: bool = setting(False, "Print the records as JSON instead of the table.", flags=("--json",))
    quiet: bool = setting(False, "No progress bar.", flags=("--quiet", "-q"))
    save_images: str | None = setting(None, "Which pictures to write: all; grids (the grids and the first "
                                            f"{GRID_IMAGES} pictures of each measurement); none (records only). "
                                            f"Default: all up to {AUTO_ALL_IMAGES} pictures per measurement, grids "
                                            "above.", choices=SAVE_IMAGES)
    reference: str | None = setting(None, "Folder of pictures (PNG, JPEG, WebP) of the run's size that set metrics "
                                          "compare with (default: the baseline's pictures).", metavar="DIR")
    reference_stats: tuple[str, ...] = setting((), "A set metric's reference statistics, METRIC=FILE.npz "
                                                   "(pytorch-fid's format: mu, sigma); repeat for several metrics.",
                                               metavar="METRIC=FILE")
    save_stats: str | None = setting(None, "Write each set metric's statistics of every measurement to "
                                           "DIR/METRIC_SAMPLER_Nsteps.npz (usable as --reference_stats).",
                                     metavar="DIR")
    html: bool = setting(False, "Also write OUTDIR/index.html: tables, grids, plots, configuration and environment "
                                "on one self-contained page.")


def default_of(options_class: type, name: str) -> Any:
    """A setting's one default, for the places that need it outside the command line."""
    return next(f.default for f in dataclasses.fields(options_class) if f.name == name)


@dataclass(frozen=True)
class BenchSpec:
    """Everything ``harness bench`` was asked to do, after option parsing; never changed by a run."""

    samplers: tuple[str, ...]
    steps: tuple[int, ...]
    model: str
    outdir: Path
    prompts: tuple[str, ...] = ()  # none: the model's default prompt
    prompt_suite: Mapping[str, Any] | None = None  # where a suite's or caption file's prompts came from, and the draw
    num_images: int = default_of(BenchOptions, "num_images")
    seed: int | None = None
    baseline_steps: int = default_of(BenchOptions, "baseline_steps")
    baseline_guidance: float = default_of(BenchOptions, "baseline_guidance")
    baseline_outdir: Path | None = None
    lora_path: str | None = None
    lora_id: str | None = None
    device: str | None = None
    dtype: str | None = None
    height: int | None = None
    width: int | None = None
    timing: timing.TimingSettings = field(default_factory=timing.TimingSettings)
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    batch: int | None = None  # images per pipeline call; None: all --num_images in one call
    sampler_options: Mapping[str, Options] = field(default_factory=dict)  # by sampler name
    metrics: tuple[str, ...] = ()
    metric_options: Mapping[str, Options] = field(default_factory=dict)  # by metric name
    save_images: str = "all"  # resolved: never None
    reference: Path | None = None
    reference_stats: Mapping[str, Path] = field(default_factory=dict)  # by metric name
    save_stats: Path | None = None

    @property
    def images_per_call(self) -> int:
        return self.batch or self.num_images

    def images_saved(self, made: int) -> int:
        """How many of a measurement's ``made`` pictures are written (the first ones, in file-name order)."""
        return {"all": made, "grids": min(made, GRID_IMAGES), "none": 0}[self.save_images]

    def config_dict(self, seed: int | None, prompts: Mapping[str, Any]) -> dict[str, Any]:
        """The run configuration every record carries (docs/reference/records.md lists its fields); ``prompts``
        names the run's prompts file by digest (``prompts_file``, ``prompts_sha256``, ``prompts_count``)."""
        config = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config.pop("prompts")
        config.update(
            samplers=list(self.samplers), steps=list(self.steps), metrics=list(self.metrics), **prompts,
            seed=seed, outdir=str(self.outdir),
            baseline_outdir=str(self.baseline_outdir) if self.baseline_outdir else None,
            reference=str(self.reference) if self.reference else None,
            reference_stats={name: str(path) for name, path in self.reference_stats.items()},
            save_stats=str(self.save_stats) if self.save_stats else None,
            speed=dataclasses.asdict(self.speed),
            sampler_options=_by_plugin(self.sampler_options), metric_options=_by_plugin(self.metric_options),
        )
        config.pop("timing")
        config.update(dataclasses.asdict(self.timing))
        return config


def _by_plugin(options: Mapping[str, Options]) -> dict[str, dict[str, Any]]:
    """Each plugin's own settings under its name; a plugin without settings is left out."""
    return {name: dataclasses.asdict(settings) for name, settings in options.items() if dataclasses.fields(settings)}
