"""Speed options change what they say they change, and the sd15-arch preset is SD 1.5's architecture."""

import json
from pathlib import Path

import pytest
import torch

from harness.benchmark.sampler import GenerationRequest, SamplerConfig
from harness.hooks.registry import get_registry
from harness.models import loading as models
from harness.models.speed import SpeedOptions
from tests.conftest import invoke


def loaded_flash(**speed):
    config = SamplerConfig(models.resolve_model("embedded"), torch.device("cpu"), torch.float32,
                           speed=SpeedOptions(**speed))
    sampler = get_registry().sampler("flash-lcm").cls(config)
    sampler.load()
    return sampler


@pytest.mark.parametrize("speed, expected", [
    ({}, {"attention_processors": ["AttnProcessor2_0"], "channels_last": False, "compiled": False,
          "vae_slicing": False, "vae_tiling": False, "lora_fused": True}),
    ({"attention": "math"}, {"attention_processors": ["AttnProcessor"]}),
    ({"attention": "sdpa"}, {"attention_processors": ["AttnProcessor2_0"]}),
    ({"channels_last": True}, {"channels_last": True}),
    ({"vae_slicing": True, "vae_tiling": True}, {"vae_slicing": True, "vae_tiling": True}),
    ({"compile": True}, {"compiled": True}),  # compiling itself happens lazily, at the first call
    ({"fuse_lora": False}, {"lora_fused": False}),
])
def test_each_option_shows_in_what_the_sampler_reports(embedded_model, speed, expected):
    details = loaded_flash(**speed).describe().details
    assert {key: details[key] for key in expected} == expected


def test_unfused_lora_draws_the_same_image_as_the_fused_one(embedded_model):
    fused, unfused = loaded_flash(), loaded_flash(fuse_lora=False)
    assert any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") and not m.merged
               for m in unfused.pipeline.unet.modules())
    request = GenerationRequest("a red circle", 2, 0.0, (5,))
    a, b = (torch.tensor(list(s.generate(request)[0].getdata()), dtype=torch.int16) for s in (fused, unfused))
    assert (a - b).abs().max() <= 2  # fusing is exact up to float rounding (and 8-bit pixel rounding)


def test_speed_options_are_recorded_in_the_config(tmp_path, embedded_model):
    result = invoke("bench", "--steps", "2", "--num_images", "4", "--batch", "2", "--no-fuse", "--attention", "math",
                    "--channels_last", "--outdir", tmp_path / "run", "--warmup", "0", "--repeats", "2", "--quiet",
                    "--json")
    assert result.exit_code == 0, result.output
    [record] = json.loads(result.output)
    assert record["config"]["speed"] == {"compile": False, "channels_last": True, "attention": "math",
                                         "fuse_lora": False, "vae_slicing": False, "vae_tiling": False}
    assert record["config"]["batch"] == 2
    # 4 images in calls of 2: two calls per pass, each a UNet batch of 2, images named 0..3.
    assert record["timing"]["images_per_call"] == 2 and record["timing"]["seconds_per_call"]["n"] == 4
    assert record["unet"]["batch_sizes"] == [2]
    assert record["images"] == [f"image_s2_i{i}.png" for i in range(4)]


def test_batch_must_divide_num_images():
    result = invoke("bench", "--dry-run", "--num_images", "3", "--batch", "2")
    assert result.exit_code == 2
    assert "--num_images 3 is not a multiple of --batch 2" in result.output


def test_sd15_arch_is_stable_diffusion_1_5_with_random_weights():
    from harness.models.architectures import build_pipeline

    spec = models.resolve_model("sd15-arch")
    assert spec.random_weights and spec.note == "random weights, timing only"
    assert spec.default_lora == models.GENERATED_LORA
    pipe = build_pipeline(Path(spec.location), torch.device("meta"), torch.float32)  # shapes only, no memory
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
