"""The README's fd-lab figures: how far from the teacher's pictures undistilled and the shipped LoRA draw.

    python scripts/lab_distance_figures.py WORK_DIR [--seed 200] [--floor_seed 300]

On the embedded model's 64 held-out prompts x 4 seeds, with the teacher (vanilla-sd, 30 steps, CFG 7.5) as
the reference: ``fd-lab`` of undistilled and of flash-lcm (the shipped LoRA) at 2 and 4 steps, and the
teacher's own noise floor - its pictures of the same prompts from other seeds against the reference. About
8 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness_plugins.lab_distance import FdLab
from PIL import Image

import harness


def baseline_images(folder: Path) -> list[Image.Image]:
    files = sorted(folder.glob("baseline_s30_i*.png"), key=lambda path: int(path.name.split("_i")[1].split("_")[0]))
    return [Image.open(path).convert("RGB") for path in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--floor_seed", type=int, default=300)
    args = parser.parse_args()
    common = dict(model="embedded", prompts="held-out", num_images=4, warmup=0, repeats=1)
    rows = []
    for record in harness.bench(sampler=["undistilled", "flash-lcm"], steps=[2, 4], seed=args.seed, metric=["fd-lab"],
                                compare_baseline=True, outdir=args.work_dir / "run", **common):
        if not record.baseline and record.measured is not None:
            rows.append((f"{record.sampler} at {record.steps} steps", record.measured.metrics["fd-lab"]["value"]))
    harness.bench(sampler=["vanilla-sd"], seed=args.floor_seed, outdir=args.work_dir / "floor", **common)
    reference = baseline_images(args.work_dir / "run" / "baseline")
    other_seeds = baseline_images(args.work_dir / "floor" / "baseline")
    floor = FdLab(harness.MetricConfig(torch.device("cpu"))).score(
        harness.MetricInput(other_seeds, [""] * len(other_seeds), reference))["value"]
    rows.insert(0, (f"the teacher itself, seed {args.floor_seed} against seed {args.seed} (noise floor)", floor))
    print("| against the teacher's pictures (30 steps, CFG 7.5) | fd-lab |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.3f} |")


if __name__ == "__main__":
    main()
