"""--lora_path takes PEFT adapter folders (as diffusers' LCM-LoRA script writes them) at their true scale."""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model

from harness import models
from harness.errors import HarnessError

RANK, ALPHA = 4, 32  # scale 8: loading at scale 1 would be far off


@pytest.fixture(scope="module")
def pipe(embedded_model):
    return StableDiffusionPipeline.from_pretrained(
        embedded_model,
        use_safetensors=True,
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="module")
def peft_adapter(pipe, tmp_path_factory):
    """A trained-looking PEFT adapter folder and its model, the reference for the adapter's true output."""
    torch.manual_seed(0)
    config = LoraConfig(
        r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    model = get_peft_model(copy.deepcopy(pipe.unet), config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    folder = tmp_path_factory.mktemp("peft") / "checkpoint-500"
    model.save_pretrained(folder)
    return folder, model


def _unet_output(unet):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, 500, states).sample


@pytest.mark.parametrize("target", ["folder", "file"])
def test_peft_adapter_loads_at_its_alpha_over_rank_scale(pipe, peft_adapter, target):
    folder, reference = peft_adapter
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == ALPHA
    lora_path = folder if target == "folder" else folder / "adapter_model.safetensors"
    student = copy.deepcopy(pipe)
    models.load_lora(student, models.resolve_lora(str(lora_path), None), fuse=True)
    expected, base = _unet_output(reference), _unet_output(pipe.unet)
    assert (expected - base).abs().mean() > 1e-2  # the adapter matters
    torch.testing.assert_close(_unet_output(student.unet), expected, atol=1e-4, rtol=1e-4)


def test_a_peft_adapter_of_another_kind_is_refused_with_its_reason(pipe, peft_adapter, tmp_path):
    import shutil

    folder = tmp_path / "loha"
    shutil.copytree(peft_adapter[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(HarnessError, match="LOHA adapter; harness loads LoRA adapters"):
        models.load_lora(copy.deepcopy(pipe), models.resolve_lora(str(folder), None))
