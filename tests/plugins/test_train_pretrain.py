"""`harness train --plugin pretrain`: a tiny SD-architecture model from scratch, in its stages, resumable."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from harness.lab.dataset import write_dataset
from tests.conftest import invoke

# Tiny widths and a handful of steps: the stages, files and resume logic, not the quality.
TINY = ("--vae_steps", "2", "--vae_decoder_steps", "1", "--batch_size", "4", "--vae_channels", "8", "8",
        "--unet_channels", "32", "32", "--text_width", "16", "--eval_every", "2", "--eval_prompts", "2",
        "--eval_steps", "2", "--checkpointing_steps", "2", "--seed", "3", "--lr_warmup_steps", "1",
        # A schedule that does not depend on --max_steps, so a 2-step run resumed to 4 is the 4-step run.
        "--lr_scheduler", "constant_with_warmup")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes") / "data", n=16, seed=0)


def _train(data, output, max_steps, *extra):
    result = invoke("train", "--plugin", "pretrain", "--data_dir", data, "--output_dir", output,
                    "--max_steps", max_steps, *TINY, *extra)
    assert result.exit_code == 0, result.output
    return output / "embedded"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data):
    return _train(data, tmp_path_factory.mktemp("straight"), 4)


def test_stages_write_a_pipeline_folder_diffusers_loads(straight):
    assert (straight / "vae" / "checkpoints" / "final" / "diffusion_pytorch_model.safetensors").is_file()
    assert (straight / "vae-decoder" / "checkpoints" / "final" / "diffusion_pytorch_model.safetensors").is_file()
    final = straight / "model" / "final"
    pipe = StableDiffusionPipeline.from_pretrained(final, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    assert pipe("a small red circle at the top on a blue background", num_inference_steps=2).images[0].size == (64, 64)
    # The latents are scaled to unit standard deviation, measured on the data (SD's recipe).
    assert pipe.vae.config.scaling_factor != 1.0


def test_cross_attention_goes_where_asked_and_the_card_says_where(tmp_path, data, straight):
    default = json.loads((straight / "model" / "final" / "unet" / "config.json").read_text())
    assert default["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert "cross-attention in block 2 of 2" in (straight / "model" / "final" / "README.md").read_text()
    everywhere = _train(data, tmp_path, 1, "--unet_blocks_without_attention", "0") / "model" / "final"
    config = json.loads((everywhere / "unet" / "config.json").read_text())
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 2
    assert config["up_block_types"] == ["CrossAttnUpBlock2D"] * 2
    assert "cross-attention in blocks 1-2 of 2" in (everywhere / "README.md").read_text()


def test_the_decoder_stage_keeps_the_encoder(straight):
    first = load_file(straight / "vae" / "checkpoints" / "final" / "diffusion_pytorch_model.safetensors")
    second = load_file(straight / "vae-decoder" / "checkpoints" / "final" / "diffusion_pytorch_model.safetensors")
    encoder = [key for key in first if key.startswith(("encoder.", "quant_conv."))]
    assert encoder and all(torch.equal(first[key], second[key]) for key in encoder)
    assert any(not torch.equal(first[key], second[key]) for key in first if key.startswith("decoder."))


def test_fidelity_is_logged_as_training_goes_and_lands_in_the_model_card(straight):
    lines = [json.loads(line) for line in (straight / "fidelity.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    # The two prompts judged ("a red circle", "two blue squares") state shape and colour.
    judged = {"overall", "commitment", "count", "shape", "colour"}
    assert all(line["n"] == 2 and 0 <= line["overall"] <= 1 and judged <= line.keys() for line in lines)
    card = (straight / "model" / "final" / "README.md").read_text()
    assert "harness train --plugin pretrain" in card and "| 4 |" in card
    # Caption reliance on the training images: the closed captions state every attribute.
    assert all(set(line["reliance"]) == {"count", "shape", "colour", "size", "position", "background"}
               for line in lines)
    assert all(value > -1 for line in lines for value in line["reliance"].values())
    assert "Caption reliance" in card and card.count("%") >= 12


def _weights(model_folder):
    return {part: load_file(model_folder / part / file) for part, file in
            (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors"))}


def _same(a, b):
    return all(a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
               for part in a)


def test_resuming_gives_the_uninterrupted_weights(tmp_path, data, straight):
    _train(data, tmp_path, 2)
    resumed = _train(data, tmp_path, 4, "--resume_from_checkpoint", "latest")
    assert _same(_weights(resumed / "model" / "final"), _weights(straight / "model" / "final"))


def test_a_bad_crop_is_one_line(tmp_path, data):
    result = invoke("train", "--plugin", "pretrain", "--data_dir", data, "--output_dir", tmp_path,
                    "--vae_crop", "12")
    assert result.exit_code == 2
    assert "--vae_crop 12 is not a multiple of 8" in result.output and "Traceback" not in result.output


def test_init_from_trains_on_a_model_with_its_vae_and_scaling(tmp_path, data, straight):
    start = straight / "model" / "final"
    # At learning rate 0 the run must hand back the very weights it started from.
    frozen = _train(data, tmp_path / "frozen", 1, "--init_from", start, "--learning_rate", "0",
                    "--vae_decoder_steps", "0")
    assert _same(_weights(frozen / "model" / "final"), _weights(start))
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    before = load_file(start / vae_file)
    assert not (frozen / "vae").exists() and not (frozen / "vae-decoder").exists()  # the model's own VAE
    kept = load_file(frozen / "model" / "final" / vae_file)
    assert kept.keys() == before.keys() and all(torch.equal(kept[k], before[k]) for k in before)
    # TINY asks for a decoder-only stage: it goes on from the model's VAE, and its encoder stays.
    moved = _train(data, tmp_path / "moved", 2, "--init_from", start)
    assert not _same(_weights(moved / "model" / "final"), _weights(start))
    assert not (moved / "vae").exists() and (moved / "vae-decoder" / "checkpoints" / "final").is_dir()
    after = load_file(moved / "model" / "final" / vae_file)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    for folder in (frozen, moved):
        vae = json.loads((folder / "model" / "final" / "vae" / "config.json").read_text())
        assert vae["scaling_factor"] == json.loads((start / "vae" / "config.json").read_text())["scaling_factor"]
    assert f"trained on from those of {start}" in (moved / "model" / "final" / "README.md").read_text()


def test_the_saved_model_is_the_weight_average_and_resumes_exactly(tmp_path, data):
    averaged = _train(data, tmp_path / "straight", 4, "--ema_decay", "0.5")
    final, last = averaged / "model" / "final", averaged / "model" / "checkpoint-4"
    trained = {name[len("param."):]: t for name, t in
               load_file(last / "training_state.safetensors").items() if name.startswith("param.")}
    unet = _weights(final)["unet"]
    # The model folder holds the average; the checkpoint keeps the trained weights beside it to resume from.
    assert any(not torch.equal(unet[k], trained[f"unet.{k}"]) for k in unet)
    assert _same(_weights(final), _weights(last))
    assert "EMA decay 0.5" in (final / "README.md").read_text()
    _train(data, tmp_path / "resumed", 2, "--ema_decay", "0.5")
    resumed = _train(data, tmp_path / "resumed", 4, "--ema_decay", "0.5", "--resume_from_checkpoint", "latest")
    assert _same(_weights(resumed / "model" / "final"), _weights(final))


def test_resuming_an_averaged_run_without_the_average_is_refused(tmp_path, data):
    _train(data, tmp_path, 2, "--ema_decay", "0.5")
    result = invoke("train", "--plugin", "pretrain", "--data_dir", data, "--output_dir", tmp_path,
                    "--max_steps", 4, *TINY, "--resume_from_checkpoint", "latest")
    assert result.exit_code != 0 and "ema" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("option", "message"), [
    (("--ema_decay", "1"), "--ema_decay 1 must be below 1"),
    (("--unet_blocks_without_attention", "2"), "--unet_blocks_without_attention 2 leaves no block of the 2"),
    (("--init_from", "nowhere"), "--init_from 'nowhere' is not a model folder (no vae/ in it)"),
    # Refused before the decoder stage spends its steps on a model the UNet stage could not take.
    (("--init_from", "MODEL", "--prediction_type", "epsilon"), "was trained with prediction_type v_prediction, "
                                                              "this run has epsilon; set --prediction_type"),
])
def test_bad_init_and_average_settings_are_one_line(tmp_path, data, straight, option, message):
    option = [str(straight / "model" / "final") if part == "MODEL" else part for part in option]
    result = invoke("train", "--plugin", "pretrain", "--data_dir", data, "--output_dir", tmp_path / "out",
                    *option, *TINY)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_logit_normal_timesteps_train_the_middle_of_the_schedule_more():
    from harness_plugins.pretrain.config import PretrainConfig, training_timesteps

    def draw(**settings):
        config = PretrainConfig(data_dir="unused", **settings)
        return training_timesteps(config, 1000, 20000, torch.Generator().manual_seed(0)).float()

    uniform, middle = draw(), draw(timestep_sampling="logit_normal")
    later = draw(timestep_sampling="logit_normal", logit_mean=1.0)
    for drawn in (uniform, middle, later):
        assert drawn.min() >= 0 and drawn.max() <= 999 and torch.equal(drawn, drawn.round())

    def share_between(drawn, low, high):
        return ((drawn >= low) & (drawn < high)).float().mean().item()

    # sigmoid(N(0, 1)): 31% of draws in t 400-599 (uniform: 20%), 1.4% above 900 (uniform: 10%).
    assert share_between(uniform, 400, 600) == pytest.approx(0.20, abs=0.01)
    assert share_between(middle, 400, 600) == pytest.approx(0.31, abs=0.01)
    assert share_between(middle, 900, 1000) == pytest.approx(0.014, abs=0.005)
    assert later.median().item() == pytest.approx(1000 * torch.sigmoid(torch.tensor(1.0)).item(), abs=10)
    assert torch.equal(middle, draw(timestep_sampling="logit_normal"))  # the seed fixes the draws


def test_the_timestep_sampling_reaches_the_loss_and_the_card(tmp_path, data):
    uniform = _train(data, tmp_path / "uniform", 2)  # step 1 is warmup at learning rate 0
    middle = _train(data, tmp_path / "middle", 2, "--timestep_sampling", "logit_normal", "--logit_std", "0.5")
    assert not _same(_weights(uniform / "model" / "final"), _weights(middle / "model" / "final"))
    card = (middle / "model" / "final" / "README.md").read_text()
    assert "timesteps logit-normal (0, 0.5)" in card
    assert "logit-normal" not in (uniform / "model" / "final" / "README.md").read_text()
