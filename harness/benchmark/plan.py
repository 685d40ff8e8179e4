"""The plan of a run (pure): its measurements (:class:`Task`), their pipeline calls and the files they write."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.benchmark.sampler import GenerationRequest

if TYPE_CHECKING:
    from harness.hooks.registry import Registry

from harness.benchmark.spec import BenchSpec


@dataclass(frozen=True)
class Task:
    """One (sampler, steps) measurement and where its files go, relative to the run folder."""

    sampler: str
    steps: int
    guidance_scale: float
    baseline: bool
    folder: str  # "" for the run folder itself
    file_label: str = ""  # the sampler's short name in comparison-grid names ("flash" for flash-lcm)


@dataclass(frozen=True)
class Plan:
    """What a run will do: its measurements in order (baselines first) and the prompts every one draws."""

    tasks: tuple[Task, ...]
    prompts: tuple[str, ...]
    seed: int
    num_images: int
    images_per_call: int
    height: int | None = None
    width: int | None = None

    @property
    def baselines(self) -> tuple[Task, ...]:
        return tuple(task for task in self.tasks if task.baseline)

    @property
    def calls_per_task(self) -> int:
        return len(self.prompts) * (self.num_images // self.images_per_call)

    def requests(self, task: Task) -> list[GenerationRequest]:
        """One request per prompt and batch; image i of prompt p always uses seed + p * num_images + i."""
        n, batch = self.num_images, self.images_per_call
        return [
            GenerationRequest(
                prompt,
                task.steps,
                task.guidance_scale,
                tuple(self.seed + p * n + i for i in range(start, start + batch)),
                self.height,
                self.width,
            )
            for p, prompt in enumerate(self.prompts)
            for start in range(0, n, batch)
        ]


def plan(spec: BenchSpec, registry: Registry, default_prompt: str, seed: int) -> Plan:
    """Baselines first, so each few-step measurement can be compared with them as soon as it ends."""
    classes = {name: registry.sampler(name).cls for name in spec.samplers}
    baselines = [n for n in spec.samplers if classes[n].is_baseline]
    few_step = [n for n in spec.samplers if not classes[n].is_baseline]
    baseline_root = _baseline_folder(spec)
    tasks = []
    for name in baselines:
        folder = baseline_root if len(baselines) == 1 else f"{baseline_root}/{name}"
        tasks.append(
            Task(name, spec.baseline_steps, spec.baseline_guidance, True, folder, classes[name].file_label or name)
        )
    for name in few_step:
        folder = "" if len(few_step) == 1 else name
        tasks += [
            Task(name, steps, classes[name].default_guidance, False, folder, classes[name].file_label or name)
            for steps in spec.steps
        ]
    return Plan(
        tuple(tasks),
        spec.prompts or (default_prompt,),
        seed,
        spec.num_images,
        spec.images_per_call,
        spec.height,
        spec.width,
    )


def _baseline_folder(spec: BenchSpec) -> str:
    if spec.baseline_outdir is None:
        return "baseline"
    return _relative_or_absolute(spec.baseline_outdir, spec.outdir)


def _relative_or_absolute(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# What file_names and comparison_name call a run's images, grids and comparisons: an --overwrite run replaces
# these in the run folder, and no other file a user keeps there.
RUN_IMAGE = re.compile(r"(image|baseline)_s\d+_i\d+(_seed\d+)?\.png|grid_(baseline_)?s\d+(_seed\d+)?\.png"
                       r"|compare_.+\.png")


def seed_suffix(seed: int | None) -> str:
    return "" if seed is None else f"_seed{seed}"


def file_names(task: Task, index: int, seed: int | None) -> tuple[str, str]:
    """The seed's names: (image ``index``, the task's grid), relative to the run folder."""
    prefix = "baseline" if task.baseline else "image"
    grid = f"grid_baseline_s{task.steps}" if task.baseline else f"grid_s{task.steps}"
    folder = f"{task.folder}/" if task.folder else ""
    suffix = seed_suffix(seed)
    return f"{folder}{prefix}_s{task.steps}_i{index}{suffix}.png", f"{folder}{grid}{suffix}.png"


def comparison_name(task: Task, baseline: Task, baselines: int, seed: int | None) -> str:
    """The seed's ``compare_baseline30_flash4_seed42.png``, named after the sampler (``file_label``); with
    several baselines each one's name replaces ``baseline``, so no two comparisons share a file."""
    folder = f"{task.folder}/" if task.folder else ""
    top = "baseline" if baselines == 1 else baseline.file_label
    return f"{folder}compare_{top}{baseline.steps}_{task.file_label}{task.steps}{seed_suffix(seed)}.png"
