"""Shared test setup: no network, a private harness cache, the shipped embedded model."""

import os

import pytest

# Set before anything imports huggingface_hub: tests must never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def harness_home(tmp_path_factory):
    """Every test (and every subprocess it starts) uses one private HARNESS_HOME and HF cache."""
    home = tmp_path_factory.mktemp("harness-home")
    previous = {key: os.environ.get(key) for key in ("HARNESS_HOME", "HF_HOME")}
    os.environ["HARNESS_HOME"] = str(home)
    os.environ["HF_HOME"] = str(home / "hf")
    yield home
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def embedded_model(harness_home):
    """The shipped embedded teacher's folder (its LoRA is checked to be there too)."""
    from harness.embedded import embedded_lora, embedded_model

    embedded_lora()
    return embedded_model()


def invoke(*args: str):
    """Run the harness CLI in-process and return click's result."""
    from click.testing import CliRunner

    from harness.cli import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)
