"""Tests for harness.models.embedded: the shipped tiny SD teacher, its few-step LoRA, and the offline tokenizer."""

import os

# Set before diffusers imports huggingface_hub: a regression that reaches for the hub fails fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from harness.errors import HarnessError
from harness.lab.scenes import held_out_prompts
from harness.models import embedded
from tests.conftest import invoke, record_json

# What the shipped lab must keep showing, at reduced size (LAB_EVERY: every 2nd held-out prompt, 4 seeds, seed 7).
# Measured on it: teacher 0.646; undistilled 0.082 / 0.296 / 0.454 at 1 / 2 / 4 steps; the shipped LoRA
# 0.208 / 0.410 / 0.555; coverage teacher 0.546, LoRA 0.525 / 0.574 at 2 / 4 steps. (The full lab, 64 prompts
# x 4 seeds, seed 100: teacher 0.670, undistilled 0.302 / 0.509 and the LoRA 0.512 / 0.627 at 2 / 4 steps.)
# The targets (teacher >= 0.90, LoRA within 0.05 of it and >= 0.20 above undistilled) are not all
# reached; README says by how much. These floors sit under the measured values so that a regression fails,
# not the targets.
LAB_EVERY = 2
TEACHER_FIDELITY_FLOOR = 0.60
BLUR_GAP = 0.25  # undistilled at 1 and 2 steps below the teacher: the target, reached (0.56 / 0.35)
LORA_GAIN = 0.08  # the shipped LoRA above undistilled at 2 and 4 steps (0.114 and 0.101 measured)
LORA_GAP_TO_TEACHER = 0.12  # the shipped LoRA at 4 steps below the teacher (0.091 measured)
COVERAGE_GAP = 0.10  # the shipped LoRA's coverage at 4 steps against the teacher's (0.028 measured)

PROMPT = "a large red circle on the left on a blue background"
MAX_SHIPPED_BYTES = 25_000_000


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return embedded.embedded_model()


@pytest.fixture(scope="module")
def lora_dir() -> Path:
    return embedded.embedded_lora()


def _load(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_output(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    prompt_embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, do_classifier_free_guidance=False)
    with torch.no_grad():
        return pipe.unet(latents, 500, prompt_embeds).sample


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


def test_shipped_weights_are_small_fp16_safetensors_with_a_model_card(model_dir, lora_dir):
    files = [p for folder in (model_dir, lora_dir) for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_SHIPPED_BYTES
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 4  # unet, vae, text encoder, LoRA
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".ckpt", ".pth", ".pkl"}]
    for path in weights:
        with safe_open(path, "pt") as tensors:
            assert {tensors.get_slice(key).get_dtype() for key in tensors.keys()} == {"F16"}, path
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert "harness train --plugin pretrain" in card and "fidelity" in card.lower()


def test_shipped_folder_loads_in_fp32_without_warnings(model_dir):
    with _library_warnings() as messages:
        pipe = _load(model_dir)
    assert messages == []
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.tokenizer(PROMPT).input_ids == embedded.build_tokenizer()(PROMPT).input_ids
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    # Zero terminal SNR: sampling starts from pure noise, as the model was trained.
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"


@pytest.fixture(scope="module")
def lab(embedded_model, tmp_path_factory) -> dict[tuple[str, int], dict]:
    """The lab at reduced size: half of the held-out prompts, 4 seeds each, the teacher (harness eval's
    30-step CFG-7.5 baseline), undistilled and the shipped LoRA at 1, 2 and 4 steps; metrics by (sampler, steps)."""
    folder = tmp_path_factory.mktemp("lab")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(held_out_prompts()[::LAB_EVERY]) + "\n", encoding="utf-8")
    result = invoke("eval", "--model", "embedded", "--sampler", "undistilled", "flash-lcm", "--steps", "1", "2", "4",
                    "--prompts", str(prompts), "--num_images", "4", "--seed", "7", "--metric", "fidelity", "coverage",
                    "--warmup", "0", "--repeats", "1", "--quiet", "--outdir", str(folder / "run"))
    assert result.exit_code == 0, result.output
    return {(record["sampler"], record["steps"]): record["metrics"] for record in record_json(folder / "run")}


@pytest.mark.slow
def test_the_lab_separates_the_teacher_the_blur_and_the_shipped_lora(lab):
    """The lab (README, "The embedded model"), on 32 of the 64 held-out prompts with 4 seeds each."""
    fidelity = {key: metrics["fidelity"]["value"] for key, metrics in lab.items()}
    teacher = fidelity[("vanilla-sd", 30)]
    assert teacher >= TEACHER_FIDELITY_FLOOR, fidelity
    for steps in (1, 2):  # the one-step mean of an open caption is a blur, not a picture
        assert fidelity[("undistilled", steps)] <= teacher - BLUR_GAP, fidelity
    for steps in (2, 4):  # the shipped LoRA draws committed pictures more often than the blur
        assert fidelity[("flash-lcm", steps)] >= fidelity[("undistilled", steps)] + LORA_GAIN, fidelity
    assert fidelity[("flash-lcm", 4)] >= teacher - LORA_GAP_TO_TEACHER, fidelity
    coverage = {key: metrics["coverage"]["value"] for key, metrics in lab.items()}
    assert abs(coverage[("flash-lcm", 4)] - coverage[("vanilla-sd", 30)]) <= COVERAGE_GAP, coverage


def test_the_shipped_lora_is_loaded_at_its_scale_and_unloads(model_dir, lora_dir):
    pipe = _load(model_dir)
    base_output = _unet_output(pipe)
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora()
    fused_output = _unet_output(pipe)
    assert (fused_output - base_output).norm() > 0.01 * base_output.norm()
    metadata, tensors = _lora_contents(lora_dir)
    config = json.loads(metadata["lora_adapter_metadata"])  # the UNet adapter's keys carry a "unet." prefix
    key = next(k for k in tensors if k.endswith("attn1.to_q.lora.down.weight")).removesuffix(".down.weight")
    scale = config["unet.lora_alpha"] / config["unet.r"]
    delta = scale * tensors[f"{key}.up.weight"].float() @ tensors[f"{key}.down.weight"].float()
    module = pipe.unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora"))
    base = StableDiffusionPipeline.from_pretrained(
        model_dir, use_safetensors=True, dtype=torch.float32
    ).unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora"))
    torch.testing.assert_close(module.weight, base.weight + delta, rtol=1e-3, atol=1e-3)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(_unet_output(pipe), base_output)


def _lora_contents(lora_dir: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(lora_dir / "pytorch_lora_weights.safetensors", "pt") as lora:
        return lora.metadata(), {key: lora.get_tensor(key) for key in lora.keys()}


def test_random_lora_state_is_seeded_and_not_a_no_op(model_dir):
    pipe = _load(model_dir)
    first, again = embedded.random_lora_state(pipe, seed=1), embedded.random_lora_state(pipe, seed=1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(next(iter(embedded.random_lora_state(pipe, seed=2).values())), next(iter(first.values())))
    assert all(torch.count_nonzero(first[key]) for key in first if ".up." in key or "lora_B" in key)


def test_missing_weights_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "SHIPPED_MODEL", tmp_path / "tiny-sd")
    with pytest.raises(HarnessError, match="embedded model's weights are missing .*reinstall harness"):
        embedded.embedded_model()


def test_no_shipped_file_names_the_folders_of_the_machine_that_built_it():
    """The model's configs, card and the docs' pictures' sources ship to every user: no absolute build path."""
    import json
    import re

    from harness.models.embedded import SHIPPED_LORA, SHIPPED_MODEL

    for root in (SHIPPED_MODEL, SHIPPED_LORA):
        for path in root.rglob("*"):
            if path.suffix == ".json":
                document = json.loads(path.read_text(encoding="utf-8"))
                assert "_name_or_path" not in document, path
            if path.suffix in (".json", ".md"):
                assert not re.search(r"(/work/|/home/|/root/|runs\d+/)", path.read_text(encoding="utf-8")), path
