"""Several `harness train --plugin pretrain` configurations side by side on one machine, each trained for as
many steps as fit a wall-clock budget: what a short GPU lease is for.

    python scripts/pretrain_sweep.py --budget 420 \\
        --config shipped= --config text128="--text_width 128 --text_layers 4" \\
        -- --data_dir SHAPES --output_dir RUNS --vae_path harness/weights/tiny-sd/vae --vae_decoder_steps 0 \\
           --batch_size 256 --ema_decay 0.999 --seed 0

1. Calibration: every configuration starts at once (they share the device as the real runs will) and the step
   rate of each is read off its train_log.jsonl between two steps; then they are stopped and removed.
2. Each configuration runs under OUTPUT_DIR/NAME with --max_steps sized to end before the budget (its
   learning-rate schedule ends with it) and five evaluations of the judge (fidelity.jsonl).
3. A run still going at the deadline is stopped; its newest checkpoint stands.

The sweep sets --run_name, --max_steps, --eval_every and --checkpointing_steps itself. It prints one line per
run and exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SET_BY_THE_SWEEP = ("--run_name", "--max_steps", "--eval_every", "--checkpointing_steps")
EVALUATIONS = 5
POLL_S = 1.0


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for the whole sweep")
    parser.add_argument("--config", action="append", required=True, metavar="NAME=FLAGS",
                        help="a run: its folder name and its own pretrain flags (repeat for each run)")
    parser.add_argument("--calibration_steps", type=int, nargs=2, default=(50, 150), metavar=("FROM", "TO"))
    parser.add_argument("--eval_seconds", type=float, default=10.0, help="allowance for one evaluation")
    args, common = parser.parse_known_args(argv)
    common = [flag for flag in common if flag != "--"]
    taken = [flag for flag in common if flag.split("=")[0].replace("-", "_").lstrip("_") in
             [name.lstrip("-") for name in SET_BY_THE_SWEEP]]
    if taken:
        parser.error(f"{', '.join(taken)} is set by the sweep for each run; remove it from the shared flags")
    if "--output_dir" not in common and "--output-dir" not in common:
        parser.error("pass --output_dir (after --) for the runs")
    start, stop = args.calibration_steps
    if not 0 < start < stop:
        parser.error("--calibration_steps FROM TO needs 0 < FROM < TO")
    configs = {}
    for item in args.config:
        name, _, flags = item.partition("=")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            parser.error(f"--config {item!r}: start with a folder name of letters, digits, '-' or '_', then '='")
        configs[name] = shlex.split(flags)
    args.configs = configs
    return args, common


def output_dir(common: list[str]) -> Path:
    flag = "--output_dir" if "--output_dir" in common else "--output-dir"
    return Path(common[common.index(flag) + 1])


def launch(name: str, flags: list[str], log_dir: Path) -> subprocess.Popen[bytes]:
    with open(log_dir / f"{name}.log", "w", encoding="utf-8") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "harness", "train", "--plugin", "pretrain", "--run_name",
                                 name, *flags], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def step_seconds(run_dir: Path) -> dict[int, float]:
    """Step -> seconds since the run's start, from its train_log.jsonl (lines still being written are skipped)."""
    seconds: dict[int, float] = {}
    log = run_dir / "train_log.jsonl"
    for line in log.read_text(encoding="utf-8").splitlines() if log.is_file() else []:
        try:
            row = json.loads(line)
            seconds[int(row["step"])] = float(row["seconds"])
        except (ValueError, KeyError):
            continue
    return seconds


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def calibrate(args: argparse.Namespace, common: list[str], root: Path,
              deadline: float) -> tuple[dict[str, float], float]:
    """Seconds per step of each configuration side by side, and the slowest start (load, latent cache)."""
    first, last = args.calibration_steps
    began = time.time()
    probes = {name: launch(f"calibrate-{name}", [*common, *flags, "--max_steps", "1000000", "--eval_every",
                                                 "1000000", "--checkpointing_steps", "1000000",
                                                 "--reliance_examples", "0"], root)
              for name, flags in args.configs.items()}
    rates: dict[str, float] = {}
    startup = 0.0
    try:
        while len(rates) < len(probes) and time.time() < deadline:
            time.sleep(POLL_S)
            for name, process in probes.items():
                seconds = step_seconds(root / f"calibrate-{name}")
                if name not in rates and first in seconds and last in seconds:
                    rates[name] = (seconds[last] - seconds[first]) / (last - first)
                    startup = max(startup, time.time() - began - seconds[last] + seconds[first])
                elif name not in rates and process.poll() is not None:
                    print(f"{name}: failed in calibration (exit {process.returncode}); see "
                          f"{root / f'calibrate-{name}.log'}", flush=True)
                    rates[name] = float("nan")
    finally:
        for name, process in probes.items():
            stop(process)
            shutil.rmtree(root / f"calibrate-{name}", ignore_errors=True)
    return {name: rate for name, rate in rates.items() if rate == rate}, startup


def main(argv: list[str]) -> int:
    args, common = parse(argv)
    deadline = time.time() + args.budget
    root = output_dir(common)
    root.mkdir(parents=True, exist_ok=True)
    rates, startup = calibrate(args, common, root, deadline)
    failed = len(args.configs) - len(rates)
    runs = {}
    for name, rate in rates.items():
        left = deadline - time.time() - startup - EVALUATIONS * args.eval_seconds
        steps = int(left / (rate * 1.05)) // EVALUATIONS * EVALUATIONS
        if steps < EVALUATIONS:
            print(f"{name}: {rate:.3f} s/step leaves no time to train in the budget; skipped", flush=True)
            failed += 1
            continue
        print(f"{name}: {steps} steps at {rate:.3f} s/step", flush=True)
        runs[name] = launch(name, [*common, *args.configs[name], "--max_steps", str(steps), "--eval_every",
                                   str(steps // EVALUATIONS), "--checkpointing_steps", str(max(1, steps // 2))], root)
    while time.time() < deadline and any(process.poll() is None for process in runs.values()):
        time.sleep(POLL_S)
    for name, process in runs.items():
        late = process.poll() is None
        stop(process)
        log = root / name / "fidelity.jsonl"
        last = json.loads(log.read_text(encoding="utf-8").splitlines()[-1]) if log.is_file() else {}
        state = "stopped at the deadline (its newest checkpoint stands)" if late else f"exit {process.returncode}"
        failed += bool(process.returncode) and not late
        print(f"{name}: {state}; judge at step {last.get('step', '-')}: {last.get('overall', '-')}; "
              f"reliance {last.get('reliance', '-')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
