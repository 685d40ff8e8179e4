"""--lora_path takes PEFT adapter folders (as diffusers' LCM-LoRA script writes them) at their true scale."""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from harness.errors import HarnessError
from harness.models import loading as models
from harness.models import lora_io

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


# A LoRA on more than the attention projections (as LCM-LoRA's recipe targets): diffusers' converter renames only
# the attention keys, and its loader guesses the naming of a whole file from its first key.
BEYOND_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj", "ff.net.2", "proj_in"]


@pytest.fixture(scope="module")
def wide_lora(pipe):
    """A UNet carrying a trained-looking LoRA on convolutions, feed-forward and attention layers (scale 8)."""
    torch.manual_seed(0)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                target_modules=BEYOND_ATTENTION))
    for name, parameter in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return unet


def _lora_layers(unet) -> int:
    return sum(1 for module in unet.modules() if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict)
               and len(module.lora_A))


def _loaded_output(pipe, lora_path):
    student = copy.deepcopy(pipe)
    models.load_lora(student, models.resolve_lora(str(lora_path), None), fuse=False)
    return _lora_layers(student.unet), _unet_output(student.unet)


def test_a_lora_beyond_attention_is_saved_in_one_naming_and_loads_whole(pipe, wide_lora, tmp_path):
    path = lora_io.save_diffusers_lora(wide_lora, tmp_path)
    with safe_open(path, "pt") as tensors:
        keys = list(tensors.keys())
    assert any(".conv1.lora.down." in key for key in keys) and any(".to_q.lora.up." in key for key in keys)
    assert all(".lora.down." in key or ".lora.up." in key for key in keys)
    layers, output = _loaded_output(pipe, tmp_path)
    assert layers == _lora_layers(wide_lora) == len(keys) // 2
    expected = _unet_output(wide_lora)
    assert (expected - _unet_output(pipe.unet)).abs().mean() > 1e-2  # the LoRA matters
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-4)


def test_a_file_in_both_namings_loads_whole_at_its_scale(pipe, wide_lora, tmp_path):
    """What harness wrote before it used one naming: attention keys renamed, the others left in PEFT's."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(wide_lora))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=state, safe_serialization=True,
        unet_lora_adapter_metadata=lora_io.adapter_metadata(wide_lora.peft_config["default"].to_dict()))
    keys = list(lora_io.safetensors_header(tmp_path / lora_io.DIFFUSERS_LORA_FILE))
    assert lora_io.mixes_key_namings(keys)
    layers, output = _loaded_output(pipe, tmp_path)
    assert layers == _lora_layers(wide_lora)
    torch.testing.assert_close(output, _unet_output(wide_lora), rtol=1e-4, atol=1e-4)


def test_a_file_in_both_namings_with_more_than_a_unet_lora_is_refused(pipe, tmp_path):
    save_file({"unet.a.to_q.lora.down.weight": torch.zeros(4, 8), "unet.a.conv1.lora_A.weight": torch.zeros(4, 8),
               "text_encoder.b.q_proj.lora_A.weight": torch.zeros(4, 8)}, tmp_path / lora_io.DIFFUSERS_LORA_FILE)
    with pytest.raises(HarnessError, match="mixes two LoRA key namings and holds more than a UNet LoRA"):
        models.load_lora(copy.deepcopy(pipe), models.resolve_lora(str(tmp_path), None))
