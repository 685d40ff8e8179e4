"""Speed suite (pytest-benchmark): `pytest benchmarks/ --benchmark-json out.json`. Not part of the tests."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def load_sampler(device):
    """Loaded samplers by name, each built once per session through the harness's own classes."""
    from harness.benchmark.sampler import SamplerConfig
    from harness.hooks.registry import get_registry
    from harness.models import loading as models

    model = models.resolve_model(models.default_model_name(device))
    loaded = {}

    def load(name):
        if name not in loaded:
            config = SamplerConfig(model, device, models.resolve_dtype(None, device))
            sampler = get_registry().sampler(name).cls(config)
            sampler.load()
            loaded[name] = sampler
        return loaded[name]

    return load
