"""The embedded model: a tiny Stable-Diffusion-architecture pipeline the harness builds itself.

Everything here is built deterministically from a seed, in memory, with nothing fetched from a hub,
so every feature of the harness runs and is tested offline on a CPU. The model is saved as an
ordinary diffusers folder and loaded with exactly the code that loads SD 1.5:
``StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)``.

The weights are random: the outputs are meaningless images, good for timing and plumbing only.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.records import write_folder_atomic

if TYPE_CHECKING:
    import diffusers
    import peft
    import torch
    import transformers

EMBEDDED_BUILD_VERSION: int = 1
"""Bump whenever the builders' output changes: it names the cache folders, so old builds are not reused."""

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
EMBEDDED_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_SHAPE_WORDS + _PROMPT_WORDS))

# SD's recipe sets the VAE scaling factor to 1 / (std of the latents). This random VAE's log-variance
# is about 0, so its posterior samples already have std ~0.98 (measured): 1.0 is that recipe's value.
# A trained VAE will need its own measurement.
_VAE_SCALING_FACTOR = 1.0
# Gaussian LoRA init leaves lora_B at zero (a no-op adapter). This std makes the stand-in LoRA change
# the UNet's output by ~15% (relative L2 norm, measured): clearly visible, far from blowing it up.
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_TOKENS)


def build_embedded_pipeline(seed: int = 0) -> diffusers.StableDiffusionPipeline:
    """The tiny SD-architecture pipeline (64x64 images, 16x16 latents) with random fp32 weights.

    The same seed gives identical weights; the global torch RNG is left as it was.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
            scaling_factor=_VAE_SCALING_FACTOR,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=_MAX_TOKENS,
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    # SD 1.5's scheduler config. from_config keeps clip_sample (not a PNDM argument) in the config,
    # as SD 1.5's file does, so schedulers built from it (DDIM, LCM) do not clip either.
    scheduler = PNDMScheduler.from_config(
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        }
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _model_card(seed: int) -> str:
    return (
        "# harness embedded model (tiny Stable Diffusion)\n\n"
        f"Built by `harness.embedded` v{EMBEDDED_BUILD_VERSION} with seed {seed}.\n\n"
        "The weights are **random**: the pipeline has SD 1.5's architecture at a tiny size "
        "(64x64 images, 16x16 latents) and loads with `StableDiffusionPipeline.from_pretrained`, "
        "but its images are not meaningful. Use it for timing and plumbing only.\n"
    )


def save_embedded_model(out_dir: Path, seed: int = 0) -> Path:
    """Build the embedded pipeline and save it (safetensors, with a model card) as out_dir."""
    pipe = build_embedded_pipeline(seed)

    def write(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        (folder / "README.md").write_text(_model_card(seed), encoding="utf-8")

    return write_folder_atomic(Path(out_dir), write, keep_existing=True)


def _lora_config(rank: int, alpha: int) -> peft.LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=_LORA_TARGET_MODULES
    )


def build_embedded_lora_state(
    pipe: diffusers.StableDiffusionPipeline, seed: int = 1, rank: int = 4, alpha: int = 4
) -> dict[str, torch.Tensor]:
    """Random LoRA weights for pipe's UNet in diffusers' format, a stand-in for a distilled LoRA.

    pipe is left unchanged. The weights act at scale alpha / rank: whoever saves them must store
    that scale too (save_embedded_lora does).
    """
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(_lora_config(rank, alpha))
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=_LORA_B_INIT_STD)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_embedded_lora(
    model_dir: Path, out_dir: Path, seed: int = 1, rank: int = 4, alpha: int = 4
) -> Path:
    """Save a stand-in LoRA for the model in model_dir as out_dir/pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    lora_state = build_embedded_lora_state(pipe, seed=seed, rank=rank, alpha=alpha)

    def write(folder: Path) -> None:
        # Without this metadata the loader assumes lora_alpha == r, which rescales the LoRA when
        # alpha != rank. Only the fields set here: LoraConfig.to_dict() would also carry every field
        # of the installed peft, which an older peft's LoraConfig(**metadata) rejects.
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=lora_state,
            unet_lora_adapter_metadata={
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": _LORA_TARGET_MODULES,
            },
            safe_serialization=True,
        )

    return write_folder_atomic(Path(out_dir), write, keep_existing=True)


def embedded_cache_dir() -> Path:
    """Where built embedded models live: $HARNESS_HOME/embedded, else ~/.cache/harness/embedded."""
    harness_home = os.environ.get("HARNESS_HOME")
    root = Path(harness_home) if harness_home else Path.home() / ".cache" / "harness"
    return root / "embedded"


def ensure_embedded_model() -> Path:
    """The cached embedded model folder, built on first use."""
    model_dir = embedded_cache_dir() / f"tiny-sd-v{EMBEDDED_BUILD_VERSION}"
    # The folder only ever appears whole (atomic rename), so its existence means it is complete.
    if not model_dir.is_dir():
        save_embedded_model(model_dir)
    return model_dir


def ensure_embedded_lora() -> Path:
    """The cached stand-in LoRA folder for the embedded model, built on first use."""
    lora_dir = embedded_cache_dir() / f"tiny-sd-v{EMBEDDED_BUILD_VERSION}-lora"
    if not lora_dir.is_dir():
        save_embedded_lora(ensure_embedded_model(), lora_dir)
    return lora_dir
