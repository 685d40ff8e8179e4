"""The runs a comparison reads: their records loaded and checked to have measured the same thing (the
same prompts, seeds and image size), and the words that name them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.records.schema import Measured, Record, successful
from harness.records.store import RECORDS_FILE, prompts_key, read_prompts, read_records


@dataclass(frozen=True)
class Run:
    """One input: the path as given and its records."""

    path: Path
    records: list[Record]

    @property
    def folder(self) -> Path:
        return self.path.parent if self.path.name == RECORDS_FILE and not self.path.is_dir() else self.path


def load_runs(paths: Sequence[Path], on_warning: Callable[[str], None]) -> list[Run]:
    """Every run's records (a line that is not a record is skipped through ``on_warning``), refused in one line
    when a run is given twice, holds no record, or measures the same thing twice."""
    runs: list[Run] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        records = read_records(path, on_skip=on_warning)
        run = Run(Path(path), records)
        key = run.folder.resolve()
        if key in seen:
            raise HarnessError(f"'{path}' is the same run as '{seen[key]}'; pass each run folder once.")
        seen[key] = run.path
        if not records:
            raise HarnessError(f"'{path}' holds no records; pass the folder of a finished `harness eval` or "
                               "`harness bench` run.")
        keys: set[tuple[str, str | None, int, float]] = set()
        for record, measured in successful(records):
            measurement = (record.sampler, lora_location(measured), record.steps, record.guidance_scale)
            if measurement in keys:
                raise HarnessError(f"'{path}' measures {record.sampler} at {record.steps} steps twice; pass one "
                                   "run per folder, not the records of several runs joined.")
            keys.add(measurement)
        runs.append(run)
    return runs


def _draws(record: Record) -> tuple[Any, Any, Any]:
    """What fixes the images a measurement scores: the prompts (by digest), the seed and the images per prompt
    (image i of prompt p draws from seed + p * num_images + i)."""
    config = record.config
    return prompts_key(config), config.get("seed"), config.get("num_images")


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse runs that scored other prompts or seeds than the first run: their metric values differ by more
    than the sampler."""
    first_run = runs[0]
    reference = _draws(first_run.records[0])
    for run in runs:
        for record in run.records:
            draws = _draws(record)
            if draws != reference:
                difference = _difference(first_run, first_run.records[0], run, record)
                raise HarnessError(f"runs '{first_run.path}' and '{run.path}' did not score the same prompts and "
                                   f"seeds ({difference}); rerun '{run.path}' with the --prompts, "
                                   f"--seed and --num_images of '{first_run.path}'.")


def _difference(first_run: Run, first: Record, run: Run, record: Record) -> str:
    (a_key, a_seed, a_images), (b_key, b_seed, b_images) = _draws(first), _draws(record)
    if a_key != b_key:
        a_prompts, b_prompts = read_prompts(first_run.folder, first.config), read_prompts(run.folder, record.config)
        if a_prompts is None or b_prompts is None or len(a_prompts) != len(b_prompts):
            return f"{_count(a_prompts)} against {_count(b_prompts)} prompts"
        index = next(i for i, (x, y) in enumerate(zip(a_prompts, b_prompts)) if x != y)
        return f"prompt {index + 1}: {short_text(a_prompts[index])} against {short_text(b_prompts[index])}"
    if a_seed != b_seed:
        return f"seed {a_seed} against {b_seed}"
    return f"{a_images} against {b_images} image(s) per prompt"


def _count(prompts: Any) -> str:
    return str(len(prompts)) if isinstance(prompts, list) else "no recorded"


def short_text(text: Any) -> str:
    shown = repr(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def setup_warning(runs: Sequence[Run]) -> str | None:
    """One line when the runs differ in model, device, dtype or image size: the rows then differ by that too."""
    setups: dict[str, str] = {}
    for run in runs:
        for record, measured in successful(run.records):
            width, height = measured.image_size
            setup = (f"{record.config.get('model')} on {record.environment.get('device_name')} "
                     f"({record.environment.get('dtype')}), {width}x{height}")
            setups.setdefault(setup, str(run.path))
    if len(setups) < 2:
        return None
    described = "; ".join(f"'{run}' {setup}" for setup, run in setups.items())
    return f"warning: the runs differ in model, device, dtype or image size ({described}); the rows differ by that too."


def title(runs: Sequence[Run]) -> str:
    record, measured = next(pair for run in runs for pair in successful(run.records))
    width, height = measured.image_size
    return (f"{record.config.get('model')} on {record.environment.get('device_name')} "
            f"({record.environment.get('dtype')}), {width}x{height}")


def lora_location(measured: Measured) -> str | None:
    """Where the measurement's LoRA was loaded from (a folder, a folder/file or a hub id), or None without one."""
    lora = measured.sampler_info.get("lora")
    return lora if isinstance(lora, str) and lora else None
