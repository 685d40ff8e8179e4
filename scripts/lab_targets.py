"""Print the embedded lab's targets (issue 12) as a markdown table: each target, its measured figure, met or not.

    python scripts/lab_targets.py RUN_DIR [RUN_DIR ...]

The run folders together must hold the teacher (the baseline record of ``harness eval`` or ``bench
--compare_baseline``), ``undistilled`` at 1, 2 and 4 steps, and one LoRA sampler (flash-lcm or local-student)
at 2 and 4 steps, all with ``--metric fidelity coverage``: e.g. the build's fresh-seed check,

    harness eval --model embedded --sampler undistilled flash-lcm --prompts held-out --num_images 4 \\
      --seed 200 --steps 1 2 4 --metric fidelity coverage --outdir RUN_DIR

The targets: the teacher's fidelity at least 0.90; ``undistilled`` at 1 and at 2 steps at least 0.25 below the
teacher; the LoRA at 2 and at 4 steps within 0.05 of the teacher, at least 0.20 above ``undistilled`` at the same
steps, and its coverage within 0.10 of the teacher's. Missed targets are reported, not an error: the exit
status is 0 whenever the runs hold every figure, 1 otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from harness import HarnessError, Measured, read_records, successful

TEACHER_FIDELITY = 0.90
BLUR_BELOW_TEACHER = 0.25
BLUR_STEPS = (1, 2)
LORA_STEPS = (2, 4)
GAP_TO_TEACHER = 0.05
GAIN_OVER_UNDISTILLED = 0.20
COVERAGE_GAP = 0.10


@dataclass(frozen=True)
class Figures:
    """Fidelity and coverage of one lab row."""

    fidelity: float
    coverage: float


@dataclass(frozen=True)
class Target:
    """One target of the lab: what it asks, the measured figure (as the text shows it), whether it holds."""

    asks: str
    measured: str
    met: bool


def lora_targets(lora: Figures, teacher: Figures, undistilled: Figures, steps: int) -> list[Target]:
    """The shipped-LoRA targets at one step count: near the teacher, well above no LoRA, the teacher's coverage."""
    gap, gain = teacher.fidelity - lora.fidelity, lora.fidelity - undistilled.fidelity
    coverage_gap = abs(lora.coverage - teacher.coverage)
    return [
        Target(f"LoRA at {steps} steps within {GAP_TO_TEACHER:.2f} of the teacher", f"{gap:.3f} below",
               gap <= GAP_TO_TEACHER),
        Target(f"LoRA at {steps} steps at least {GAIN_OVER_UNDISTILLED:.2f} above undistilled", f"{gain:.3f} above",
               gain >= GAIN_OVER_UNDISTILLED),
        Target(f"LoRA coverage at {steps} steps within {COVERAGE_GAP:.2f} of the teacher's",
               f"{lora.coverage:.3f} vs {teacher.coverage:.3f}", coverage_gap <= COVERAGE_GAP),
    ]


def all_targets(teacher: Figures, undistilled: dict[int, Figures], lora: dict[int, Figures]) -> list[Target]:
    """Every target of the lab, in the issue's order."""
    targets = [Target(f"teacher fidelity at least {TEACHER_FIDELITY:.2f}", f"{teacher.fidelity:.3f}",
                      teacher.fidelity >= TEACHER_FIDELITY)]
    for steps in BLUR_STEPS:
        below = teacher.fidelity - undistilled[steps].fidelity
        targets.append(Target(f"undistilled at {steps} step{'s' * (steps > 1)} at least {BLUR_BELOW_TEACHER:.2f} "
                              "below the teacher", f"{below:.3f} below", below >= BLUR_BELOW_TEACHER))
    for steps in LORA_STEPS:
        targets += lora_targets(lora[steps], teacher, undistilled[steps], steps)
    return targets


def figures(measured: Measured, where: str) -> Figures:
    """A row's fidelity and coverage; HarnessError when it was measured without them."""
    try:
        return Figures(float(measured.metrics["fidelity"]["value"]), float(measured.metrics["coverage"]["value"]))
    except (KeyError, TypeError, ValueError):
        raise HarnessError(f"{where} has no fidelity and coverage values; run it with --metric fidelity coverage") \
            from None


def lab_rows(folders: list[Path]) -> tuple[Figures, dict[int, Figures], dict[int, Figures], str]:
    """The teacher's figures, undistilled's and the LoRA's by steps, and the LoRA sampler's name."""
    teacher, undistilled, loras = None, {}, {}
    for folder in folders:
        for record, measured in successful(read_records(folder)):
            where = f"{folder}: {record.sampler} at {record.steps} steps"
            if record.baseline:
                teacher = figures(measured, where)
            elif record.sampler == "undistilled":
                undistilled[record.steps] = figures(measured, where)
            else:
                # Keyed by the LoRA too: two LoRAs sampled by local-student are two entries, not one.
                key = (record.sampler, measured.sampler_info.get("lora"))
                loras.setdefault(key, {})[record.steps] = figures(measured, where)
    if teacher is None:
        raise HarnessError("no teacher row: pass the run of `harness eval` (or `bench --compare_baseline`)")
    missing = sorted({*BLUR_STEPS, *LORA_STEPS} - set(undistilled))
    if missing:
        raise HarnessError(f"no undistilled row at {missing} steps: run --sampler undistilled --steps 1 2 4")
    described = sorted(sampler if lora is None else f"{sampler} with {lora}" for sampler, lora in loras)
    if len(loras) != 1:
        raise HarnessError(f"the runs hold {len(loras)} LoRA samplers ({', '.join(described) or 'none'}); "
                           "pass runs with exactly one")
    [((name, _), lora)] = loras.items()
    if any(steps not in lora for steps in LORA_STEPS):
        raise HarnessError(f"{described[0]} needs rows at {LORA_STEPS} steps; it has {sorted(lora)}")
    return teacher, undistilled, lora, name


def table(targets: list[Target], sampler: str) -> str:
    lines = [f"| target ({sampler}) | measured | met |", "|---|---|---|"]
    lines += [f"| {target.asks} | {target.measured} | {'yes' if target.met else 'no'} |" for target in targets]
    met = sum(target.met for target in targets)
    return "\n".join(lines) + f"\n\n{met} of {len(targets)} targets met.\n"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python scripts/lab_targets.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    try:
        teacher, undistilled, lora, name = lab_rows([Path(folder) for folder in argv])
    except HarnessError as error:
        print(f"lab_targets: {error}", file=sys.stderr)
        return 1
    print(table(all_targets(teacher, undistilled, lora), name), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
