"""The README's streaming figures: memory and cost of a measurement at 100 and at 10,000 prompts.

    python scripts/streaming_scale.py WORK_DIR [--counts 100 10000]

Each count is one ``harness bench`` process on the embedded model: flash-lcm at 2 steps, ``--metric fd-lab``
against a statistics file (``--reference_stats``, 512 pictures of the shapes data, written here first),
``--save_images none --warmup 0 --repeats 1``. For each it reports the whole process's peak RSS (``wait4``, so
model loading and the metric count too), the record's sampler seconds per image and the metric's seconds per
image, measured apart. The 10,000-prompt run takes about 10 minutes on a 2-core CPU; run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from harness_plugins.lab_distance import FdLab
from tabulate import tabulate

import harness
from harness.lab import scenes, shapes

REFERENCE_PICTURES = 512


def reference_statistics(path: Path) -> None:
    """fd-lab's statistics of pictures of the shapes data: what the runs compare with."""
    rng = random.Random(0)
    pictures = [shapes.render(shapes.sample_attributes(rng), 64) for _ in range(REFERENCE_PICTURES)]
    metric = FdLab(harness.MetricConfig(torch.device("cpu")))
    metric.reset()
    metric.update(harness.MetricInput(pictures, [""] * len(pictures)))
    with path.open("wb") as handle:
        np.savez(handle, **metric.statistics())


def run(count: int, work: Path, stats: Path) -> dict[str, float]:
    prompts = work / f"prompts_{count}.txt"
    held_out = scenes.held_out_prompts()
    prompts.write_text("\n".join(held_out[i % len(held_out)] for i in range(count)) + "\n", encoding="utf-8")
    outdir = work / f"run_{count}"
    command = [sys.executable, "-m", "harness", "bench", "--model", "embedded", "--sampler", "flash-lcm", "--steps",
               "2", "--prompts", str(prompts), "--metric", "fd-lab", "--reference_stats", f"fd-lab={stats}",
               "--save_images", "none", "--warmup", "0", "--repeats", "1", "--seed", "0", "--outdir", str(outdir),
               "--overwrite", "-q"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"harness bench with {count} prompts failed; run it by hand: {' '.join(command)}")
    [record] = [json.loads(line) for line in (outdir / "records.jsonl").read_text(encoding="utf-8").splitlines()]
    metric = record["metrics"]["fd-lab"]
    return {"prompts": count, "process peak RSS MB": usage.ru_maxrss / 1024,
            "measured peak RSS MB": record["memory"]["peak_rss_mb"],
            "sampler s/image": record["timing"]["seconds_per_image"],
            "metric s/image": metric["metric_s"] / count, "fd-lab": metric["value"], "wall s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 10_000])
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    stats = args.work_dir / "shapes_fd-lab.npz"
    reference_statistics(stats)
    rows = [run(count, args.work_dir, stats) for count in args.counts]
    print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"))
    first, last = rows[0], rows[-1]
    print(f"\npeak RSS {last['process peak RSS MB'] - first['process peak RSS MB']:+.0f} MB from {first['prompts']} to "
          f"{last['prompts']} prompts; sampler s/image {last['sampler s/image'] / first['sampler s/image'] - 1:+.1%}")


if __name__ == "__main__":
    main()
