"""Several `harness train --plugin pretrain` configurations side by side on one machine, each trained for as
many steps as fit a wall-clock budget: what a short GPU lease is for.

    python scripts/pretrain_sweep.py --budget 420 \\
        --config shipped= --config text128="--text_width 128 --text_layers 4" \\
        -- --data_dir SHAPES --output_dir RUNS --vae_path harness/models/weights/tiny-sd/vae --vae_decoder_steps 0 \\
           --batch_size 256 --ema_decay 0.999 --seed 0

1. Calibration: every configuration starts at once (they share the device as the real runs will) and the step
   rate of each is read off its train_log.jsonl between two steps; then they are stopped and removed.
2. Each configuration runs under OUTPUT_DIR/NAME with --max_steps sized to end before the budget (its
   learning-rate schedule ends with it) and five evaluations of the judge (fidelity.jsonl).
3. A run still going at the deadline is stopped; its newest checkpoint, if it wrote one, stands.

The sweep sets --run_name, --max_steps, --eval_every and --checkpointing_steps itself. It prints one line per
configuration and exits 1 if any did not train to its end (failed, skipped or stopped at the deadline).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import harness

# Flags the sweep sets for each run; a configuration may not set the shared --output_dir either.
SET_BY_THE_SWEEP = ("run_name", "max_steps", "eval_every", "checkpointing_steps")
SHARED_BY_ALL = ("output_dir",)
EVALUATIONS = 5
POLL_S = 1.0


class Stopped(Exception):
    """SIGTERM reached the sweep: its runs are stopped before it exits."""


def _flag_names(flags: list[str]) -> list[str]:
    return [flag.split("=")[0].lstrip("-").replace("-", "_") for flag in flags if flag.startswith("--")]


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for the whole sweep")
    parser.add_argument("--config", action="append", required=True, metavar="NAME=FLAGS",
                        help="a run: its folder name and its own pretrain flags (repeat for each run)")
    parser.add_argument("--calibration_steps", type=int, nargs=2, default=(50, 150), metavar=("FROM", "TO"))
    parser.add_argument("--eval_seconds", type=float, default=10.0, help="allowance for one evaluation")
    args, common = parser.parse_known_args(argv)
    common = [flag for flag in common if flag != "--"]
    if not 0 < args.budget < math.inf:  # NaN fails both comparisons
        parser.error(f"--budget {args.budget:g} must be a finite number of seconds above 0")
    if not 0 <= args.eval_seconds < math.inf:
        parser.error(f"--eval_seconds {args.eval_seconds:g} must be a finite number of seconds, 0 or more")
    start, stop = args.calibration_steps
    if not 0 < start < stop:
        parser.error("--calibration_steps FROM TO needs 0 < FROM < TO")
    owned = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    owned.add_argument("--output_dir", "--output-dir")
    shared, _ = owned.parse_known_args(common)
    if not shared.output_dir:
        parser.error("pass --output_dir (after --) for the runs")
    args.root = Path(shared.output_dir).expanduser()
    taken = [name for name in _flag_names(common) if name in SET_BY_THE_SWEEP]
    if taken:
        parser.error(f"--{taken[0]} is set by the sweep for each run; remove it from the shared flags")
    args.configs = {}
    for item in args.config:
        name, _, flags = item.partition("=")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            parser.error(f"--config {item!r}: start with a folder name of letters, digits, '-' or '_', then '='")
        if name in args.configs:
            parser.error(f"--config {name} is given twice; give each run its own name")
        own = shlex.split(flags)
        taken = [flag for flag in _flag_names(own) if flag in SET_BY_THE_SWEEP + SHARED_BY_ALL]
        if taken:
            parser.error(f"--config {name}: --{taken[0]} is set by the sweep; remove it from that run's flags")
        args.configs[name] = own
    restarts = {"overwrite", "resume_from_checkpoint"} & set(_flag_names(common))
    existing = [name for name in args.configs if (args.root / name / "model").exists()]
    if existing and not restarts:
        parser.error(f"{args.root / existing[0]} already holds a run; pick another --output_dir, or pass "
                     "--overwrite or --resume_from_checkpoint latest")
    return args, common


def launch(name: str, flags: list[str], root: Path) -> subprocess.Popen[bytes]:
    with open(root / f"{name}.log", "w", encoding="utf-8") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "harness", "train", "--plugin", "pretrain", *flags,
                                 "--run_name", name],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def step_seconds(run_dir: Path) -> dict[int, float]:
    """Step -> seconds since the run's start, from its train_log.jsonl (lines still being written are skipped)."""
    return dict(harness.TrainingRun(run_dir).step_seconds())


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every process group at once, then SIGKILL to those still there after 30 s."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def calibrate(args: argparse.Namespace, common: list[str], deadline: float) -> tuple[dict[str, float], float]:
    """Seconds per step of each configuration while all of them train, and an upper bound of the time a run
    takes to reach steady steps (load, latent cache, the first FROM steps and the polling delay)."""
    first, last = args.calibration_steps
    root = args.root
    began = time.time()
    probes = {name: launch(f"calibrate-{name}", [*common, *flags, "--max_steps", "1000000", "--eval_every",
                                                 "1000000", "--checkpointing_steps", "1000000",
                                                 "--reliance_examples", "0"], root)
              for name, flags in args.configs.items()}
    windows: dict[str, tuple[int, float]] = {}  # where each one's window starts: once every live probe is at FROM
    rates: dict[str, float] = {}
    startup = 0.0
    try:
        while len(rates) < len(probes) and time.time() < deadline:
            time.sleep(POLL_S)
            logged = {name: step_seconds(root / f"calibrate-{name}") for name in probes}
            for name, process in probes.items():
                if name not in rates and process.poll() is not None:
                    print(f"{name}: failed in calibration (exit {process.returncode}); see "
                          f"{root / f'calibrate-{name}.log'}", flush=True)
                    rates[name] = float("nan")
            live = [name for name in probes if name not in rates]
            if not windows and live and all(max(logged[name], default=0) >= first for name in live):
                startup = time.time() - began
                windows = {name: (max(logged[name]), logged[name][max(logged[name])]) for name in live}
            for name, (step, seconds) in windows.items():
                now = max(logged[name], default=0)
                if name not in rates and now >= step + last - first:
                    rates[name] = (logged[name][now] - seconds) / (now - step)
        for name in probes:
            if name not in rates:
                print(f"{name}: not calibrated before the deadline; skipped", flush=True)
    finally:
        stop_all(list(probes.values()))
        for name in probes:
            shutil.rmtree(root / f"calibrate-{name}", ignore_errors=True)
    return {name: rate for name, rate in rates.items() if rate == rate}, startup


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped


def main(argv: list[str]) -> int:
    args, common = parse(argv)
    deadline = time.time() + args.budget
    args.root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_stopped)
    rates, startup = calibrate(args, common, deadline)
    failed = len(args.configs) - len(rates)
    runs: dict[str, subprocess.Popen[bytes]] = {}
    late: set[str] = set()
    try:
        for name, rate in rates.items():
            left = deadline - time.time() - startup - EVALUATIONS * args.eval_seconds
            steps = int(left / (rate * 1.05)) // EVALUATIONS * EVALUATIONS
            if steps < EVALUATIONS:
                print(f"{name}: {rate:.3f} s/step leaves no time to train in the budget; skipped", flush=True)
                failed += 1
                continue
            print(f"{name}: {steps} steps at {rate:.3f} s/step", flush=True)
            runs[name] = launch(name, [*common, *args.configs[name], "--max_steps", str(steps), "--eval_every",
                                       str(steps // EVALUATIONS), "--checkpointing_steps", str(max(1, steps // 2))],
                                args.root)
        while time.time() < deadline and any(process.poll() is None for process in runs.values()):
            time.sleep(POLL_S)
        late = {name for name, process in runs.items() if process.poll() is None}
    finally:
        stop_all(list(runs.values()))
    for name, process in runs.items():
        evaluations = harness.json_objects(args.root / name / "fidelity.jsonl")
        last = evaluations[-1] if evaluations else {}
        state = ("stopped at the deadline (its newest checkpoint, if any, stands)" if name in late
                 else f"exit {process.returncode}")
        failed += name in late or process.returncode != 0
        print(f"{name}: {state}; judge at step {last.get('step', '-')}: {last.get('overall', '-')}; "
              f"reliance {last.get('reliance', '-')}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (KeyboardInterrupt, Stopped):
        sys.exit("pretrain_sweep: stopped; its runs were stopped too")
