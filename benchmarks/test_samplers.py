"""Seconds per call of each built-in sampler on the default model (embedded without CUDA).

Each round is one generation call bracketed by the harness's own synchronize (``timing.timed``), so
pytest-benchmark's statistics cover the same region as ``harness bench``'s.
"""

import pytest

from harness.benchmark import timing
from harness.benchmark.sampler import GenerationRequest

PROMPT = "a small red circle at the top on a blue background"


def run_protocol(benchmark, sampler, device, steps, guidance):
    request = GenerationRequest(PROMPT, steps, guidance, (0,))
    benchmark.extra_info.update(sampler=sampler.name, steps=steps, guidance_scale=guidance)
    benchmark.pedantic(timing.timed, args=(lambda: sampler.generate(request), device),
                       rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_flash_lcm(benchmark, load_sampler, device, steps):
    run_protocol(benchmark, load_sampler("flash-lcm"), device, steps, 0.0)


def test_vanilla_sd_baseline(benchmark, load_sampler, device):
    run_protocol(benchmark, load_sampler("vanilla-sd"), device, 30, 7.5)
