"""LoRA files in and out, always at their true scale (lora_alpha / r).

diffusers' ``load_lora_weights`` rebuilds a LoRA's ``LoraConfig`` from the ``lora_adapter_metadata`` entry
of the safetensors header; a file without it loads at scale 1 (alpha taken equal to the rank), so a LoRA
trained with rank 4 and alpha 32 would act 8 times weaker than it did in training. ``save_diffusers_lora``
always writes that entry.

PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
and diffusers' LCM-LoRA example script write them) keep the scale in the JSON file and prefix every key
with ``base_model.model.``. ``load_lora_weights`` finds no ``unet.`` key in them and silently loads nothing;
``load_peft_adapter`` loads them into the pipeline's UNet with their own config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def adapter_metadata(lora_config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``LoraConfig`` fields that decide which layers carry the LoRA and at what scale.

    Only these, and the optional ones only when set: the whole ``LoraConfig.to_dict()`` carries every
    field of the installed peft, which an older peft's ``LoraConfig(**metadata)`` rejects.
    """
    targets = lora_config["target_modules"]
    metadata: dict[str, Any] = {
        "r": lora_config["r"],
        "lora_alpha": lora_config["lora_alpha"],
        # A string is a regular expression; a list or set is module names (sorted: stable file bytes).
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }
    for optional in ("rank_pattern", "alpha_pattern", "use_rslora"):
        if lora_config.get(optional):
            metadata[optional] = lora_config[optional]
    return metadata


def save_diffusers_lora(unet, folder: Path, adapter_name: str = "default") -> Path:
    """Write ``unet``'s adapter as ``folder/pytorch_lora_weights.safetensors`` with its scale in the header."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=adapter_metadata(unet.peft_config[adapter_name].to_dict()),
        safe_serialization=True,
    )
    return Path(folder) / DIFFUSERS_LORA_FILE


def peft_adapter_folder(location: str, weight_name: str | None) -> Path | None:
    """The folder, when a local LoRA source is a PEFT adapter folder rather than a diffusers LoRA."""
    folder = Path(location)
    if weight_name not in (None, PEFT_WEIGHTS_FILE):
        return None
    if weight_name is None and (folder / DIFFUSERS_LORA_FILE).is_file():
        return None
    if (folder / PEFT_CONFIG_FILE).is_file() and (folder / PEFT_WEIGHTS_FILE).is_file():
        return folder
    return None


def load_peft_adapter(pipe, folder: Path) -> None:
    """Load a PEFT UNet adapter folder into ``pipe.unet`` at its configured scale (not fused).

    Raises ValueError with a one-line reason when the folder is not a UNet LoRA adapter.
    """
    from safetensors.torch import load_file

    config = json.loads((folder / PEFT_CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{PEFT_CONFIG_FILE} describes a {config['peft_type']} adapter; harness loads LoRA adapters")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class", "UNet2DConditionModel")
    if base_class != "UNet2DConditionModel":
        raise ValueError(f"{PEFT_CONFIG_FILE} is an adapter for a {base_class}, not for the UNet")
    weights = load_file(folder / PEFT_WEIGHTS_FILE)
    if not all(key.startswith(PEFT_KEY_PREFIX) for key in weights):
        raise ValueError(f"{PEFT_WEIGHTS_FILE} keys do not start with '{PEFT_KEY_PREFIX}' as PEFT writes them")
    # diffusers' pipeline loader expects keys and metadata under the component's name.
    unet_state = {"unet." + key.removeprefix(PEFT_KEY_PREFIX): value for key, value in weights.items()}
    metadata = {f"unet.{key}": value for key, value in adapter_metadata(config).items()}
    pipe.load_lora_into_unet(unet_state, network_alphas=None, unet=pipe.unet, metadata=metadata, _pipeline=pipe)
