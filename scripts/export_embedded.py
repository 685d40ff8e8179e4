"""Copy a trained embedded teacher and its few-step LoRA into the package, as fp16 safetensors.

    python scripts/export_embedded.py MODEL_DIR LORA_DIR [--card CARD.md]

MODEL_DIR is the ``final/`` folder of ``harness train --plugin pretrain``, LORA_DIR the ``final/`` folder of
the few-step LoRA that won the lab (``harness train --plugin distill``, ``lcm`` or ``flash``); they replace
``harness/models/weights/`` (what ``--model embedded`` loads).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import harness
from harness import write_folder_atomic

LORA_FILE = "pytorch_lora_weights.safetensors"


def export_model(model_dir: Path, card: Path | None, out: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float16, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        forget_build_folders(folder)
        if card is not None:
            shutil.copyfile(card, folder / "README.md")

    write_folder_atomic(out, write)


def forget_build_folders(folder: Path) -> None:
    """diffusers writes the folder a model was loaded from into its configs (``_name_or_path``): a shipped model
    must not name the machine that built it."""
    for config in folder.rglob("*.json"):
        document = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(document, dict) and document.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_lora(lora_dir: Path, out: Path) -> None:
    with safe_open(str(lora_dir / LORA_FILE), framework="pt") as source:
        # The header holds the adapter's rank and alpha: without it the LoRA would load at the wrong scale.
        metadata = source.metadata()
        tensors = {name: source.get_tensor(name).half() for name in source.keys()}

    def write(folder: Path) -> None:
        save_file(tensors, str(folder / LORA_FILE), metadata=metadata)

    write_folder_atomic(out, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("lora_dir", type=Path)
    parser.add_argument("--card", type=Path, help="Model card to ship as README.md beside the weights.")
    args = parser.parse_args()
    for target in (harness.SHIPPED_MODEL, harness.SHIPPED_LORA):
        shutil.rmtree(target, ignore_errors=True)
    export_model(args.model_dir, args.card, harness.SHIPPED_MODEL)
    export_lora(args.lora_dir, harness.SHIPPED_LORA)
    size = sum(f.stat().st_size for root in (harness.SHIPPED_MODEL, harness.SHIPPED_LORA)
               for f in root.rglob("*") if f.is_file())
    print(f"wrote {harness.SHIPPED_MODEL} and {harness.SHIPPED_LORA}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
