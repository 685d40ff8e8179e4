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
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # The defining modules, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# Names diffusers never picks as a folder's LoRA file (_best_guess_weight_name): optimizer and scheduler states.
NOT_LORA_NAMES = ("scheduler", "optimizer", "checkpoint")
# Bits per element of each safetensors dtype: a tensor's byte range must match its shape.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E5M2FNUZ": 8, "F8_E4M3FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# The two namings of a LoRA layer's factors: diffusers' (down, up) and PEFT's (A, B).
DIFFUSERS_NAMING = (".lora.down.", ".lora.up.")
PEFT_NAMING = (".lora_A.", ".lora_B.")
# The safetensors metadata entry diffusers writes a LoRA's LoraConfig fields into.
LORA_METADATA_KEY = "lora_adapter_metadata"
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; safetensors refuses larger headers too


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


def save_diffusers_lora(unet: UNet2DConditionModel, folder: Path, adapter_name: str = "default") -> Path:
    """Write ``unet``'s adapter as ``folder/pytorch_lora_weights.safetensors`` with its scale in the header."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = diffusers_key_naming(convert_state_dict_to_diffusers(  # type: ignore[no-untyped-call]  # unannotated
        get_peft_model_state_dict(unet, adapter_name=adapter_name)
    ))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=adapter_metadata(unet.peft_config[adapter_name].to_dict()),
        safe_serialization=True,
    )
    return Path(folder) / DIFFUSERS_LORA_FILE


def diffusers_key_naming(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with every LoRA key in diffusers' naming (``.lora.down.`` / ``.lora.up.``).

    diffusers' ``convert_state_dict_to_diffusers`` renames only the attention projections' keys and leaves a
    convolution's or feed-forward layer's ``lora_A`` / ``lora_B``; its loader then guesses the naming of the whole
    file from the first key, so one file in both namings loads only part of its layers, without an error.
    """
    return {key.replace(PEFT_NAMING[0], DIFFUSERS_NAMING[0]).replace(PEFT_NAMING[1], DIFFUSERS_NAMING[1]): value
            for key, value in state.items()}


def mixes_key_namings(keys: Iterable[str]) -> bool:
    """Whether LoRA keys come in both diffusers' (``.lora.down.``) and PEFT's (``.lora_A.``) naming."""
    namings = {naming for key in keys for naming in (DIFFUSERS_NAMING, PEFT_NAMING)
               if naming[0] in key or naming[1] in key}
    return len(namings) == 2


def load_mixed_naming_lora(pipe: StableDiffusionPipeline, path: Path) -> None:
    """Load a UNet LoRA file whose keys mix both namings (see ``diffusers_key_naming``) at its scale, not fused.

    Such files come from harness before it wrote one naming, or from scripts that save
    ``convert_state_dict_to_diffusers`` output of a LoRA on more than the attention projections.
    Raises ValueError when the file holds more than the UNet's LoRA.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as tensors:
        keys, file_metadata = list(tensors.keys()), tensors.metadata() or {}
        if not all(key.startswith("unet.") for key in keys):
            raise ValueError(f"{path.name} mixes two LoRA key namings and holds more than a UNet LoRA; save it "
                             "again with one naming")
        state = diffusers_key_naming({key: tensors.get_tensor(key) for key in keys})
    metadata = json.loads(file_metadata[LORA_METADATA_KEY]) if LORA_METADATA_KEY in file_metadata else None
    pipe.load_lora_into_unet(state, network_alphas=None, unet=pipe.unet, metadata=metadata, _pipeline=pipe)


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


def load_peft_adapter(pipe: StableDiffusionPipeline, folder: Path) -> None:
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


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header (name -> dtype, shape, data_offsets), checked.

    Read and checked against the file's size before safetensors maps the file: a file cut short, damaged or
    made to mislead is a ValueError with a one-line reason, not a crash inside the loader (a mapped file that
    ends early kills the process) or a request for absurd amounts of memory.
    """
    name = Path(path).name
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError(f"{name} is not a safetensors file or is cut short ({size} bytes, a header of "
                                 f"{header_size} bytes announced)")
            raw = handle.read(header_size)
    except OSError as error:
        raise ValueError(f"cannot read {name}: {error.strerror or error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ValueError(f"{name} has a damaged header (__metadata__ is not an object of strings)")
    for tensor, entry in header.items():
        problem = _tensor_entry_problem(entry, size - 8 - header_size)
        if problem is not None:
            raise ValueError(f"{name} has a damaged header: tensor {tensor[:100]!r} {problem}")
    return header


def _tensor_entry_problem(entry: object, data_size: int) -> str | None:
    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict):
        return "is not described by a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
        return f"has an unknown dtype ({str(dtype)[:20]})"
    if not isinstance(shape, list) or not all(whole(side) for side in shape):
        return "has no valid shape"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(whole(offset) for offset in offsets):
        return "has no valid data_offsets"
    begin, end = offsets
    if not begin <= end <= data_size:
        return f"lies outside the file (bytes {begin}-{end} of {data_size}): the file is cut short or damaged"
    if math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] != (end - begin) * 8:
        return f"holds {end - begin} bytes, not what shape {shape} of {dtype} needs"
    return None


def lora_weights_file(folder: Path, weight_name: str | None) -> Path | None:
    """The file diffusers (or ``load_peft_adapter``) will load from a local LoRA source, or None when there is none.

    The same choice as diffusers' own guess (``pytorch_lora_weights.safetensors`` first, never an optimizer or
    scheduler file), made here so the file can be checked before loading and then named to diffusers.
    """
    if weight_name is not None:
        return folder / weight_name
    if peft_adapter_folder(str(folder), None) is not None:
        return folder / PEFT_WEIGHTS_FILE
    candidates = sorted(path for path in folder.glob("*.safetensors")
                        if path.is_file() and not any(word in path.name for word in NOT_LORA_NAMES))
    preferred = [path for path in candidates if path.name == DIFFUSERS_LORA_FILE]
    return (preferred or candidates)[0] if candidates else None


def non_finite_tensors(path: Path) -> tuple[list[str], int]:
    """The names of the tensors of a safetensors file that hold NaN or inf, and how many tensors it holds.

    A LoRA trained into NaN loads without complaint and turns every image black; naming it at load time says
    which file is broken. Raises ValueError when the file itself is damaged.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    names = list(safetensors_header(path))
    broken = []
    try:
        with safe_open(path, framework="pt") as weights:
            for name in names:
                tensor = weights.get_tensor(name)
                if tensor.is_floating_point() and tensor.element_size() == 1:
                    tensor = tensor.float()  # torch has no isfinite for every 8-bit float format
                if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                    broken.append(name)
    except SafetensorError as error:
        raise ValueError(f"{Path(path).name}: {(str(error).splitlines() or ['damaged'])[0]}") from None
    return broken, len(names)


# Key prefixes diffusers' load_lora_weights reads in a Stable Diffusion LoRA (its own and kohya's naming); a file
# with none of them loads nothing, silently.
# The factor of a LoRA layer that peft starts at zero, in each naming (diffusers', PEFT's, kohya's).
UP_FACTORS = (".lora.up.", ".lora_B.", ".lora_up.")
KNOWN_KEY_PREFIXES = ("unet.", "text_encoder.", "lora_unet_", "lora_te_", "lora_te1_", PEFT_KEY_PREFIX)


def lora_adapters(*models: Any) -> set[str]:
    """The names of the LoRA adapters loaded into ``models`` (a UNet, a text encoder; None is skipped)."""
    from peft.tuners.lora import LoraLayer

    return {adapter for model in models if model is not None for module in model.modules()
            if isinstance(module, LoraLayer) for adapter in (*module.lora_A, *module.lora_embedding_A)}


def changed_layers(*models: Any, skip: Iterable[str] = ()) -> tuple[int, int, int]:
    """(layers the LoRA changes, layers it was loaded into, those at scale 0) over the adapters of ``models`` not
    in ``skip``.

    A layer changes the model only when both of its factors hold a non-zero value and its scale is not 0. A file
    whose keys match no layer, another architecture's LoRA loaded with its target module names, and a file of
    zeros all load without an error: their layers keep factors of zeros (peft starts ``lora_B`` at zero).
    """
    from peft.tuners.lora import LoraLayer

    skipped = set(skip)
    changed = loaded = unscaled = 0
    for model in models:
        if model is None:
            continue
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            factors = {**{name: (module.lora_A[name].weight, module.lora_B[name].weight) for name in module.lora_A},
                       **{name: (module.lora_embedding_A[name], module.lora_embedding_B[name])
                          for name in module.lora_embedding_A}}
            for name, (down, up) in factors.items():
                if name in skipped:
                    continue
                loaded += 1
                if module.scaling.get(name, 1) == 0:
                    unscaled += 1
                elif bool(down.any()) and bool(up.any()):
                    changed += 1
    return changed, loaded, unscaled


def inert_reason(path: Path | None, loaded: int, unscaled: int = 0) -> str:
    """Why a LoRA changed no layer of the model it was loaded into (``path``: its local file, when there is one)."""
    if path is not None:
        from safetensors import safe_open

        names = list(safetensors_header(path))
        if not names:
            return f"{path.name} holds no tensors, only metadata"
        if not any(name.startswith(KNOWN_KEY_PREFIXES) for name in names):
            return (f"none of the {len(names)} keys of {path.name} starts with a prefix a LoRA loader reads "
                    f"({', '.join(repr(prefix) for prefix in KNOWN_KEY_PREFIXES)}), e.g. {names[0][:80]!r}")
        with safe_open(path, framework="pt") as tensors:
            nonzero = [name for name in names if bool(tensors.get_tensor(name).any())]
        if not nonzero:
            return f"every value of the {len(names)} tensors of {path.name} is zero"
        ups = [name for name in names if any(up in name for up in UP_FACTORS)]
        if ups and not set(ups) & set(nonzero):
            return (f"every one of its {len(ups)} up factors (lora.up / lora_B) is zero, so it adds nothing to "
                    "any layer (an untrained LoRA?)")
    if loaded and unscaled == loaded:
        return f"its scale is 0 (lora_alpha 0) in all {loaded} of its layers"
    if loaded:
        return (f"its weights reached none of the {loaded} LoRA layer(s) made for it in the model (a LoRA for "
                "another architecture?)")
    return "its keys match no layer of this model's UNet or text encoder (a LoRA for another architecture?)"
