"""What each speed option does to seconds/image, measured in one process with the variants interleaved.

    python benchmarks/speed_options.py --model embedded --steps 4
    python benchmarks/speed_options.py --model sd15-arch --size 256 --steps 4 --skip compile

Each variant is a flash-lcm sampler loaded with one option changed; every round measures every variant
once (harness.benchmark.timing.measure, so the same protocol as `harness bench`), and the table reports the median
over rounds and the ratio to the default variant. Ratios within one run are what to trust on a shared
machine; absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
from tabulate import tabulate

from harness.benchmark import timing
from harness.benchmark.sampler import GenerationRequest, SamplerConfig
from harness.cli.app import quiet_libraries
from harness.hooks.registry import get_registry
from harness.models import loading as models
from harness.models.speed import SpeedOptions

VARIANTS = {
    "default": SpeedOptions(),
    "no-fuse": SpeedOptions(fuse_lora=False),
    "channels-last": SpeedOptions(channels_last=True),
    "attention math": SpeedOptions(attention="math"),
    "attention sdpa": SpeedOptions(attention="sdpa"),
    "vae-slicing": SpeedOptions(vae_slicing=True),
    "vae-tiling": SpeedOptions(vae_tiling=True),
    "compile": SpeedOptions(compile=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, help="height and width in pixels (default: the model's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="measured calls per variant per round")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out, e.g. compile")
    args = parser.parse_args()
    quiet_libraries()

    device = models.resolve_device(None)
    model = models.resolve_model(args.model)
    request = GenerationRequest(model.default_prompt, args.steps, 0.0, tuple(range(args.batch)), args.size, args.size)
    settings = timing.TimingSettings(warmup=1, repeats=args.repeats)
    calls = {}
    for name, speed in VARIANTS.items():
        if name in args.skip:
            continue
        sampler = get_registry().sampler("flash-lcm").cls(
            SamplerConfig(model, device, models.resolve_dtype(None, device), speed=speed))
        sampler.load()
        calls[name] = partial(sampler.generate, request)
        calls[name]()  # pays compilation before the rounds start

    medians: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            medians[name].append(timing.measure([call], device, settings).stats.median / args.batch)
    reference = statistics.median(medians["default"])
    rows = [[name, f"{statistics.median(values) * 1000:.1f}", f"{statistics.median(values) / reference:.3f}"]
            for name, values in medians.items()]
    print(f"flash-lcm, {model.name}, {args.steps} steps, {args.size or 'native'} px, batch {args.batch}, "
          f"{device}, {models.resolve_dtype(None, device)}, {torch.__version__}")
    print(tabulate(rows, headers=["variant", "ms/image (median of rounds)", "ratio to default"], tablefmt="github"))


if __name__ == "__main__":
    main()
