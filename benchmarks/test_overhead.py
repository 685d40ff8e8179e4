"""Harness overhead: the same pipeline call timed by a bare loop and by harness.benchmark.timing, interleaved.

Target: the harness's median within 1% of the bare median. Run with ``-s`` to see the ratio; it is also
stored in the benchmark JSON (``extra_info``).
"""

import statistics
import time
from functools import partial

import torch

from harness.benchmark import timing
from harness.benchmark.sampler import GenerationRequest

ROUNDS = 12  # blocks of (bare, harness), alternated so machine noise hits both alike
CALLS_PER_BLOCK = 5


def bare_median(pipe_call, device):
    samples = []
    for _ in range(CALLS_PER_BLOCK):
        timing.synchronize(device)
        start = time.perf_counter()
        pipe_call()
        timing.synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def test_harness_overhead(benchmark, load_sampler, device):
    sampler = load_sampler("flash-lcm")
    request = GenerationRequest("a small red circle at the top on a blue background", 4, 0.0, (0,))
    pipe = sampler.pipeline

    def bare_call():
        # Fresh seeded generators every call, as any loop that wants the same image each time needs.
        return pipe(prompt=request.prompt, num_inference_steps=4, guidance_scale=0.0, num_images_per_prompt=1,
                    generator=[torch.Generator("cpu").manual_seed(0)])

    settings = timing.TimingSettings(warmup=0, repeats=CALLS_PER_BLOCK)
    harness_call = partial(sampler.generate, request)
    for _ in range(2):
        bare_call()  # warm both paths up before anything is compared

    bare, harnessed = [], []

    def one_round():
        # Alternate which path goes first, so neither always inherits the other's cache and clock state.
        steps = [lambda: bare.append(bare_median(bare_call, device)),
                 lambda: harnessed.append(timing.measure([harness_call], device, settings).stats.median)]
        for step in steps if len(bare) % 2 == 0 else steps[::-1]:
            step()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    ratio = statistics.median(harnessed) / statistics.median(bare)
    benchmark.extra_info.update(bare_median_s=statistics.median(bare), harness_median_s=statistics.median(harnessed),
                                ratio=ratio)
    print(f"\nharness/bare median ratio: {ratio:.4f} (bare {statistics.median(bare) * 1000:.2f} ms, "
          f"harness {statistics.median(harnessed) * 1000:.2f} ms)")
    assert ratio < 1.05, "the harness adds more than 5% to a call"
