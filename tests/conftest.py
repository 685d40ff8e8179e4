"""Shared test setup: no network, a private harness cache, the shipped embedded model."""

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# Set before anything imports huggingface_hub: tests must never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where torch sees a CUDA device and are skipped, saying so, elsewhere."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA: torch sees no CUDA device on this machine"))


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
    from harness.models.embedded import embedded_lora, embedded_model

    embedded_lora()
    return embedded_model()


def invoke(*args: str):
    """Run the harness CLI in-process and return click's result."""
    from click.testing import CliRunner

    from harness.cli.app import cli

    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def record_json(path) -> list[dict]:
    """The JSON objects of a run's records.jsonl, as users and other tools read the file."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        path = path / "records.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_record(sampler="flash-lcm", steps=4, seconds_per_image=0.1, *, baseline=False, guidance_scale=0.0,
                image_size=(64, 64), images_per_call=1, device_name="x86_64", dtype="float32", error=None,
                stdev=0.0, evaluations=None, stages=None, metrics=None, world_size=1, images=None, grid=None,
                comparisons=(), warnings=(), config=None):
    """A complete, valid record (``harness.records.schema.Record``) with figures a test chooses; ``error`` makes
    it failed."""
    from harness.records.schema import Comparison, Measured, Memory, Record, Stages, Timing, UnetCounts
    from harness.records.stats import Stats

    common = dict(sampler=sampler, baseline=baseline, steps=steps, guidance_scale=guidance_scale,
                  created_utc="2026-01-01T00:00:00Z",
                  config=config or {"model": "embedded", "prompts": ["a cat"], "num_images": images_per_call,
                                    "seed": 42, "warmup": 0, "repeats": 5},
                  environment={"device": "cpu", "device_name": device_name, "dtype": dtype}, world_size=world_size)
    if error is not None:
        return Record(**common, error=error)
    per_call = seconds_per_image * images_per_call
    evaluations = evaluations if evaluations is not None else steps * (2 if guidance_scale > 1 else 1)
    stages = stages or {
        "total_s": per_call,
        "denoise_s": per_call * 0.8,
        "per_step_s": [per_call * 0.8 / steps] * steps,
    }
    folder = "baseline/" if baseline else ""
    prefix = "baseline" if baseline else "image"
    measured = Measured(
        sampler_info={"model": "embedded", "scheduler": "LCMScheduler (trailing)", "lora": None, "details": {}},
        timing=Timing(
            load_s=1.0,
            first_call_s=per_call * 2,
            seconds_per_call=Stats(
                n=5,
                min=per_call,
                max=per_call + stdev,
                mean=per_call,
                median=per_call,
                stdev=stdev,
                p90=per_call,
                iqr=0.0,
            ),
            samples_s=[per_call] * 5,
            images_per_call=images_per_call,
            seconds_per_image=seconds_per_image,
            images_per_s=1 / seconds_per_image,
            aggregate_images_per_s=1 / seconds_per_image,
        ),
        unet=UnetCounts(
            calls=steps,
            batch_sizes=[2 if guidance_scale > 1 else 1],
            evaluations=evaluations,
            evaluations_per_image=evaluations / images_per_call,
        ),
        stages=Stages(**{"text_encode_s": 0.0, "decode_s": 0.0, "unet_batch_sizes": [], "unet_calls": steps, **stages}),
        memory=Memory(peak_rss_mb=400.0),
        deterministic=True,
        image_size=list(image_size),
        images=list(images) if images is not None else [f"{folder}{prefix}_s{steps}_i0_seed42.png"],
        grid=grid or f"{folder}grid_{'baseline_' if baseline else ''}s{steps}_seed42.png",
        warnings=list(warnings),
        metrics=metrics or {},
        comparisons=[Comparison(*c) for c in comparisons],
    )
    return Record(**common, measured=measured)


def load_script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), imported from its file so its functions can be called directly."""
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    path = scripts / f"{name}.py"
    if str(scripts) not in sys.path:
        sys.path.append(str(scripts))  # as `python scripts/NAME.py` has it: scripts import one another
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
