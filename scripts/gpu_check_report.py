"""Checks the run folders that scripts/gpu_check.sh wrote and prints one table of what it measured.

    python scripts/gpu_check_report.py WORK_DIR

Exit code 0 when every check passed, 1 when one failed (each failure is printed as one line).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness import RECORDS_FILE, Record, read_records, successful, successful_baselines

SPEED_VARIANTS = ("plain", "channels-last", "compile", "compile-channels-last")
FEW_STEPS = (2, 4, 8)
BASELINE_STEPS = 30
# The target on an H100-class GPU: flash-lcm, 4 steps, 512x512, fp16, with --compile.
TARGET_VARIANT, TARGET_STEPS, TARGET_SECONDS = "compile", 4, 0.040


def expected_unet_evaluations(record: Record) -> int:
    """UNet evaluations per image: one per step without guidance; PNDM's 31 calls x 2 (CFG) for the baseline."""
    if record.baseline:
        return 2 * (record.steps + 1)
    return record.steps


def exit_code(work: Path, name: str) -> int | None:
    path = work / f"{name}.exit"
    return int(path.read_text().strip()) if path.is_file() else None


def check_speed_variant(work: Path, name: str) -> tuple[list[list[Any]], list[str]]:
    """Rows of the table and failures of one `harness bench` variant."""
    folder = work / name
    failures: list[str] = []
    code = exit_code(work, name)
    if code != 0:
        failures.append(f"{name}: harness exited with {code} (see {work / (name + '.log')})")
    if not (folder / RECORDS_FILE).is_file():
        return [], failures + [f"{name}: no {RECORDS_FILE}"]
    records = read_records(folder / RECORDS_FILE, on_skip=lambda problem: failures.append(f"{name}: {problem}"))
    found = {(r.sampler, r.steps) for r in records}
    for wanted in [("vanilla-sd", BASELINE_STEPS)] + [("flash-lcm", steps) for steps in FEW_STEPS]:
        if wanted not in found:
            failures.append(f"{name}: no record of {wanted[0]} at {wanted[1]} steps")
    failures += [f"{name}: {r.sampler} {r.steps} steps: failed: {r.error}" for r in records if not r.ok]
    baselines = successful_baselines(records)
    baseline = baselines[0][1] if baselines else None
    rows = []
    for record, measured in successful(records):
        label = f"{name}: {record.sampler} {record.steps} steps"
        memory = measured.memory
        if memory.cuda_max_allocated_mb is None or memory.cuda_max_reserved_mb is None:
            failures.append(f"{label}: the record has no CUDA memory figures ({memory})")
        if not measured.deterministic:
            failures.append(f"{label}: the measured repeats did not give identical pixels")
        evaluations = measured.unet.evaluations_per_image
        if evaluations != expected_unet_evaluations(record):
            failures.append(f"{label}: {evaluations:g} UNet evaluations per image, expected "
                            f"{expected_unet_evaluations(record)}")
        device, dtype = record.environment.get("device"), record.environment.get("dtype")
        if not str(device).startswith("cuda") or dtype != "float16":
            failures.append(f"{label}: ran on {device} in {dtype}, not cuda float16")
        seconds = measured.timing.seconds_per_image
        per_step = measured.stages.per_step_s
        rows.append([
            name, record.sampler, record.steps, evaluations, f"{seconds * 1000:.1f}",
            f"{measured.timing.images_per_s:.2f}",
            f"{1 / statistics.mean(per_step):.1f}" if per_step else "",
            f"{measured.timing.first_call_s:.2f}",
            f"{memory.cuda_max_allocated_mb or 0:.0f}", f"{memory.cuda_max_reserved_mb or 0:.0f}",
            measured.deterministic,
            f"{baseline.timing.seconds_per_image / seconds:.2f}x" if baseline and measured is not baseline else "",
        ])
    return rows, failures


def check_out_of_memory(work: Path) -> list[str]:
    """The request that cannot fit must end cleanly, no traceback, either way harness can end it: refused before
    any call by its memory estimate (exit 2, one line naming the memory, no records) or, when the estimate let it
    through, as a failed record with the out-of-memory line (exit 1)."""
    failures: list[str] = []
    log = work / "out-of-memory.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    code = exit_code(work, "out-of-memory")
    if "Traceback" in text:
        failures.append(f"out-of-memory: a traceback in {log}")
    records_path = work / "out-of-memory" / RECORDS_FILE
    records = read_records(records_path, on_skip=failures.append) if records_path.is_file() else []
    if code == 2:
        errors = [line for line in text.splitlines() if line.startswith("Error:")]
        if len(errors) != 1 or "GiB" not in errors[0] or "available" not in errors[0]:
            failures.append(f"out-of-memory: exit 2 without the one-line memory refusal in {log}")
        if records:
            failures.append("out-of-memory: refused up front, yet records were written")
    elif code == 1:
        if not any("CUDA out of memory" in (r.error or "") for r in records):
            failures.append("out-of-memory: no failed record saying 'CUDA out of memory'")
    else:
        failures.append(f"out-of-memory: harness exited with {code}, expected 2 (refused up front) or 1 "
                        "(a failed record)")
    return failures


def check_torchrun(work: Path) -> tuple[list[list[Any]], list[str]]:
    if exit_code(work, "torchrun") is None:
        return [], []  # one GPU: nothing was launched
    rows, failures = check_speed_variant(work, "torchrun")
    records_path = work / "torchrun" / RECORDS_FILE
    if records_path.is_file() and any(r.world_size != 2 for r in read_records(records_path, on_skip=failures.append)):
        failures.append("torchrun: records without world_size 2")
    return rows, failures


def target_line(rows: list[list[Any]]) -> str:
    row = next((r for r in rows if r[0] == TARGET_VARIANT and r[1] == "flash-lcm" and r[2] == TARGET_STEPS), None)
    if row is None:
        return f"target: no {TARGET_VARIANT} flash-lcm {TARGET_STEPS}-step measurement"
    verdict = "met" if float(row[4]) <= TARGET_SECONDS * 1000 else "missed"
    return (
        f"target (H100-class GPU): flash-lcm {TARGET_STEPS} steps, 512x512 fp16, --compile: {row[4]} ms/image, "
        f"{verdict} (<= {TARGET_SECONDS * 1000:.0f} ms)"
    )


def main(work: Path) -> int:
    rows: list[list[Any]] = []
    failures: list[str] = []
    for name in SPEED_VARIANTS:
        variant_rows, variant_failures = check_speed_variant(work, name)
        rows += variant_rows
        failures += variant_failures
    torchrun_rows, torchrun_failures = check_torchrun(work)
    rows += torchrun_rows
    failures += torchrun_failures + check_out_of_memory(work)
    headers = [
        "variant",
        "sampler",
        "steps",
        "UNet evals/image",
        "ms/image",
        "images/s",
        "UNet it/s",
        "first call s",
        "max allocated MB",
        "max reserved MB",
        "deterministic",
        "speedup",
    ]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print()
    print(target_line(rows))
    for failure in failures:
        print(f"FAILED {failure}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python scripts/gpu_check_report.py WORK_DIR (the folder scripts/gpu_check.sh wrote)")
    sys.exit(main(Path(sys.argv[1])))
