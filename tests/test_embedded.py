"""Tests for harness.embedded: the tiny offline SD pipeline and its stand-in LoRA."""

import os

# Set before diffusers imports huggingface_hub: a regression that reaches for the hub fails fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import logging
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from harness import embedded

PROMPT = "a red circle at the top left of a blue background"
LORA_RANK, LORA_ALPHA = 4, 8  # alpha != rank, so a lost scale shows up


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return embedded.save_embedded_model(tmp_path_factory.mktemp("embedded") / "model")


@pytest.fixture(scope="module")
def lora_dir(model_dir) -> Path:
    return embedded.save_embedded_lora(
        model_dir, model_dir.parent / "lora", rank=LORA_RANK, alpha=LORA_ALPHA
    )


def _load(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    prompt_embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, do_classifier_free_guidance=False)
    with torch.no_grad():
        return pipe.unet(latents, 500, prompt_embeds).sample


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def _library_warnings():
    """Python warnings plus the diffusers/transformers loggers' warnings (they do not propagate)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def test_tokenizer_makes_each_known_word_one_token():
    tokenizer = embedded.build_tokenizer()
    for word in embedded.EMBEDDED_WORDS:
        assert len(tokenizer.tokenize(word)) == 1, word
    words = tokenizer.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"])
    assert tokenizer("a red circle").input_ids == [
        tokenizer.bos_token_id,
        *words,
        tokenizer.eos_token_id,
    ]
    assert tokenizer.model_max_length == 77


def test_tokenizer_takes_any_text_without_unknown_tokens():
    tokenizer = embedded.build_tokenizer()
    text = "zyzzyva naïve wörld 日本語 🐱🚀"
    ids = tokenizer(text).input_ids
    # The unknown token is <|endoftext|> (CLIP's convention): it may only close the sequence.
    assert ids.count(tokenizer.unk_token_id) == 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_same_seed_saves_identical_bytes_and_keeps_global_rng(model_dir, tmp_path):
    rng_state = torch.random.get_rng_state()
    again = embedded.save_embedded_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert _files(again) == _files(model_dir)


def test_seed_changes_weights():
    first = embedded.build_embedded_pipeline(seed=0).unet.conv_in.weight
    second = embedded.build_embedded_pipeline(seed=1).unet.conv_in.weight
    assert not torch.equal(first, second)


def test_saved_folder_loads_without_warnings(model_dir):
    assert not [p for p in model_dir.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
    card = (model_dir / "README.md").read_text()
    assert f"v{embedded.EMBEDDED_BUILD_VERSION}" in card and "seed 0" in card and "random" in card

    with _library_warnings() as messages:
        pipe = _load(model_dir)
    assert messages == []
    assert pipe.tokenizer(PROMPT).input_ids == embedded.build_tokenizer()(PROMPT).input_ids
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_pndm_cfg_and_two_step_lcm_make_64px_images(model_dir):
    pipe = _load(model_dir)
    # Few PNDM steps keep the test quick; the default size must come out at 64x64.
    pndm = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5).images[0]
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    lcm = pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, height=64, width=64).images[0]
    assert pndm.size == lcm.size == (64, 64)


def test_lora_round_trips_changes_output_and_unloads(model_dir, lora_dir):
    pipe = _load(model_dir)
    base_output = _unet_output(pipe)
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    base_weight = to_q.weight.detach().clone()

    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora()
    fused_output = _unet_output(pipe)
    assert (fused_output - base_output).norm() > 0.05 * base_output.norm()

    # The fused delta is up @ down at the file's own scale alpha / rank.
    lora = load_file(lora_dir / "pytorch_lora_weights.safetensors")
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    delta = LORA_ALPHA / LORA_RANK * lora[f"{key}.up.weight"] @ lora[f"{key}.down.weight"]
    torch.testing.assert_close(to_q.weight, base_weight + delta)  # peft wrapped this Linear

    # unload_lora_weights() alone would keep the fused delta in the weights.
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(_unet_output(pipe), base_output)

    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora()
    torch.testing.assert_close(_unet_output(pipe), fused_output)


def _lora_contents(lora_dir: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", "pt") as lora:
        return lora.metadata(), {key: lora.get_tensor(key) for key in lora.keys()}


def test_same_seed_saves_identical_lora(model_dir, lora_dir, tmp_path):
    again = embedded.save_embedded_lora(
        model_dir, tmp_path / "lora", rank=LORA_RANK, alpha=LORA_ALPHA
    )
    # Not bytes: safetensors writes the header's metadata keys in a random (hash map) order.
    again_metadata, again_tensors = _lora_contents(again)
    metadata, tensors = _lora_contents(lora_dir)
    assert again_metadata == metadata
    assert again_tensors.keys() == tensors.keys()
    assert all(torch.equal(again_tensors[key], tensors[key]) for key in tensors)


def test_save_into_existing_folder_keeps_it(tmp_path):
    winner = tmp_path / "model"
    winner.mkdir()
    (winner / "winner.txt").write_text("built first")
    assert embedded.save_embedded_model(winner) == winner
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    assert [p.name for p in winner.iterdir()] == ["winner.txt"]


def test_ensure_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path))
    version = embedded.EMBEDDED_BUILD_VERSION
    model = embedded.ensure_embedded_model()
    lora = embedded.ensure_embedded_lora()
    assert model == tmp_path / "embedded" / f"tiny-sd-v{version}"
    assert lora == tmp_path / "embedded" / f"tiny-sd-v{version}-lora"
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    built = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    assert embedded.ensure_embedded_model() == model
    assert embedded.ensure_embedded_lora() == lora
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == built


def test_cache_dir_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HARNESS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded.embedded_cache_dir() == tmp_path / ".cache" / "harness" / "embedded"
