"""The embedded model: a tiny Stable-Diffusion-architecture text-to-image model that ships with harness.

``harness/models/weights/tiny-sd`` is a diffusers folder (fp16 safetensors) trained from scratch by the project
(``scripts/build_embedded_model.sh``: ``harness train --plugin pretrain`` on ``harness.lab.shapes`` captions),
and ``harness/models/weights/tiny-sd-flash-lora`` its few-step LoRA (``harness train --plugin distill``). They
load with exactly the code that loads SD 1.5 and its Flash LoRA, so every feature of the harness runs and
is tested offline on a CPU, on a model whose pictures can be judged (``harness.lab.judge``).

This module also builds the model's tokenizer: a CLIP BPE tokenizer made in memory, with nothing
fetched from a hub.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError

if TYPE_CHECKING:
    import peft
    import torch
    import transformers

    # The defining module, not ``diffusers``: for type checkers, diffusers' top-level names are its dummy objects.
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED_MODEL = WEIGHTS / "tiny-sd"
SHIPPED_LORA = WEIGHTS / "tiny-sd-flash-lora"

_END_OF_WORD = "</w>"
_BOS_TOKEN = "<|startoftext|>"
_EOS_TOKEN = "<|endoftext|>"
_MAX_TOKENS = 77

# Whole-word tokens: the grammar of the synthetic shapes captions, then common prompt words
# (including every word of the harness's default prompts).
_SHAPE_WORDS = (
    "a", "an", "the", "small", "large", "big", "circle", "square", "triangle",
    "at", "on", "top", "bottom", "left", "right", "centre", "center", "background", "of", "in", "with",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black", "gray", "grey",
    "brown", "cyan", "magenta",
)  # fmt: skip
_PROMPT_WORDS = (
    "beautiful", "landscape", "mountains", "and", "lake", "sunset", "highly", "detailed",
    "futuristic", "city", "night", "neon", "lights", "cyberpunk", "style", "cat", "wearing",
    "sunglasses", "serene", "forest", "path", "majestic", "eagle", "flight", "underwater", "coral",
    "reef", "steampunk", "airship", "floating", "above", "clouds", "astronaut", "space", "pokemon",
    "character", "dog", "bird", "horse", "fish", "dragon", "robot", "man", "woman", "girl", "boy",
    "person", "portrait", "face", "eyes", "hair", "hat", "dress", "photo", "photograph", "painting",
    "drawing", "sketch", "illustration", "watercolor", "oil", "digital", "art", "anime", "cartoon",
    "realistic", "fantasy", "cinematic", "dramatic", "epic", "cute", "old", "ancient", "modern",
    "castle", "tower", "house", "village", "street", "road", "bridge", "car", "river", "ocean", "sea",
    "beach", "island", "desert", "field", "grass", "tree", "trees", "flower", "flowers", "garden",
    "sky", "sun", "moon", "stars", "cloud", "rain", "snow", "fog", "fire", "water", "light", "dark",
    "bright", "colorful", "vibrant", "golden", "hour", "sunrise", "morning", "winter", "summer",
    "autumn", "lighting", "soft", "sharp", "focus", "high", "quality", "resolution", "view", "close",
    "up", "wide", "angle", "shot", "scene", "nature", "animal", "flying", "standing", "sitting",
    "walking", "holding", "table", "room", "window", "book", "cup", "coffee", "apple", "by", "from",
    "under", "over", "near", "is", "very",
)  # fmt: skip
# The open-caption grammar's words come last, so the token ids of every word before them stay those of the
# first embedded model's tokenizer.
_OPEN_GRAMMAR_WORDS = ("two", "three", "circles", "squares", "triangles", "shape", "shapes")
EMBEDDED_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_SHAPE_WORDS + _PROMPT_WORDS + _OPEN_GRAMMAR_WORDS))

# Gaussian LoRA init leaves lora_B at zero (a no-op adapter). This std makes a random LoRA change the
# UNet's output by ~15% (relative L2 norm, measured on a random UNet): clearly visible, far from blowing it up.
_LORA_B_INIT_STD = 0.1
_LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)]


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each word into one token.

    Each word grows left to right, but every merge is applied to all words before the next one is
    chosen (as BPE training does): a plain per-word chain would break words whose inner pairs an
    earlier word's chain already merged (``red``'s ``r e`` would split ``green``).
    """
    symbols = {word: [*word[:-1], word[-1] + _END_OF_WORD] for word in words}
    merges: list[tuple[str, str]] = []
    for word in symbols:
        while len(symbols[word]) > 1:
            pair = (symbols[word][0], symbols[word][1])
            merges.append(pair)
            symbols = {w: _merge_pair(s, pair) for w, s in symbols.items()}
    return merges


def build_tokenizer() -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory: whole-word tokens for EMBEDDED_WORDS, bytes for the rest.

    Every byte-level character is in the vocabulary alone and with the end-of-word suffix, so any
    text (unknown words, unicode, emoji) tokenizes without an unknown token.
    """
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    merges = _word_merges(EMBEDDED_WORDS)
    # CLIP's vocabulary order: bytes, bytes ending a word, merge results, then the special tokens.
    tokens = alphabet + [c + _END_OF_WORD for c in alphabet] + [a + b for a, b in merges]
    tokens += [_BOS_TOKEN, _EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    # The annotation says list[str]; the tokenizers BPE model it hands merges to takes (left, right) pairs.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_TOKENS)  # type: ignore[arg-type]


def _lora_config(rank: int, alpha: int) -> peft.LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=_LORA_TARGET_MODULES
    )


def random_lora_state(
    pipe: StableDiffusionPipeline, seed: int = 1, rank: int = 4, alpha: int = 4
) -> dict[str, torch.Tensor]:
    """Random LoRA weights for pipe's UNet in diffusers' format: the stand-in LoRA of random architectures.

    pipe is left unchanged. The weights act at scale alpha / rank: whoever saves them must store
    that scale too.
    """
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(_lora_config(rank, alpha))
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=_LORA_B_INIT_STD)
    # diffusers leaves convert_state_dict_to_diffusers unannotated.
    state: dict[str, torch.Tensor] = convert_state_dict_to_diffusers(  # type: ignore[no-untyped-call]
        get_peft_model_state_dict(unet)
    )
    return state


# Every file from_pretrained and load_lora_weights read. A wheel or checkout can hold the JSON files but not
# the weights (a package build that dropped them, a git-lfs pointer checkout), so each one is checked.
SHIPPED_MODEL_FILES = (
    "model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
SHIPPED_LORA_FILES = ("pytorch_lora_weights.safetensors",)
# A git-lfs pointer file is ~130 bytes; the smallest real weights file shipped is over 100 kB.
_MIN_WEIGHTS_BYTES = 1024


def _shipped(folder: Path, required: Iterable[str]) -> Path:
    for name in required:
        path = folder / name
        if not path.is_file() or (path.suffix == ".safetensors" and path.stat().st_size < _MIN_WEIGHTS_BYTES):
            raise HarnessError(f"the embedded model's weights are missing ('{path}'); reinstall harness "
                               "from a complete checkout or wheel (pip install -e . or pip install "
                               "fewstep_harness-*.whl built by python -m build), or pass --model with another model.")
    return folder


def embedded_model() -> Path:
    """The shipped teacher: a diffusers folder for StableDiffusionPipeline.from_pretrained."""
    return _shipped(SHIPPED_MODEL, SHIPPED_MODEL_FILES)


def embedded_lora() -> Path:
    """The shipped few-step LoRA of the teacher (pytorch_lora_weights.safetensors), as flash-lcm loads it."""
    return _shipped(SHIPPED_LORA, SHIPPED_LORA_FILES)
