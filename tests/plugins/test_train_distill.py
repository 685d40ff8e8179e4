"""`harness train --plugin distill` on the embedded model: the issue's done-when checks and the trainer's promises."""

import json

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from harness_plugins.distill import DistillConfig, DistillTrainer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from harness.lab.dataset import write_dataset
from harness.lab.scenes import held_out_prompts
from harness.reporting.grids import GAP, LABEL_HEIGHT, MIN_TILE
from tests.conftest import invoke, record_json
from tests.training.test_train_data import write_shapes

# Real training, several processes or a real model per test: not part of the fast subset.
pytestmark = pytest.mark.slow

PROMPTS = ["a red circle on a blue background", "a yellow square on a green background"]
SEEDS = [0, 1]
# Every 16th held-out caption (never in training data): "a red circle", "a yellow triangle", "two blue squares",
# "three white circles", the layout open. Two captions drawn well (4 pictures) were too few: with the v3 model
# their pixel distance to the teacher went up and down as distillation went on, while over these it falls at
# every checkpoint (20, 40, 60, 80 steps).
HELD_OUT = held_out_prompts()[::16]
# Small and fast: a 4-step teacher, lr high enough to move a LoRA in 40 steps, a schedule with state.
FAST = ("--teacher_steps", "4", "--student_steps", "2", "4", "--grad_accum", "1", "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "5", "--seed", "7")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes") / "data", count=8)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, embedded_model, shapes):
    """The done-when command: 40 steps, a checkpoint every 20, validation at each checkpoint."""
    output = tmp_path_factory.mktemp("runs")
    result = invoke("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes,
                    "--max_steps", "40", "--checkpointing_steps", "20", "--output_dir", output,
                    "--run_name", "straight", "--validation_prompts", PROMPTS[0], "--validation_every", "20", *FAST)
    assert result.exit_code == 0, result.output
    return output / "straight"


def _weights(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-6, err_msg=key)


def test_writes_the_seeds_checkpoint_layout(straight_run):
    lora = straight_run / "lora"
    assert sorted(p.name for p in lora.iterdir()) == ["checkpoint-20", "checkpoint-40", "final"]
    for checkpoint in ("checkpoint-20", "checkpoint-40"):
        assert {p.name for p in (lora / checkpoint).iterdir()} == {
            "pytorch_lora_weights.safetensors", "training_state.safetensors", "training_state.json"}
    assert [p.name for p in (lora / "final").iterdir()] == ["pytorch_lora_weights.safetensors"]
    _assert_same_weights(_weights(lora / "checkpoint-40"), _weights(lora / "final"))


def test_config_records_the_resolved_run(straight_run):
    config = json.loads((straight_run / "config.json").read_text())
    assert config["trainer"] == "distill"
    assert config["config"]["gradient_accumulation_steps"] == 1  # given as --grad_accum
    assert config["config"]["student_steps"] == [2, 4]
    resolved = config["resolved"]
    assert resolved["resolution"] == 64  # the embedded model's native size, as --resolution was not given
    assert resolved["mixed_precision"] == "no" and resolved["world_size"] == 1 and resolved["seed"] == 7
    assert resolved["lora"] == {"r": 4, "lora_alpha": 32, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}
    assert resolved["student_timesteps"] == {"2": [999, 499, -1], "4": [999, 759, 499, 259, -1]}


def test_train_log_has_one_line_per_step_with_the_lr_schedule(straight_run):
    lines = [json.loads(line) for line in (straight_run / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 41))
    assert all(np.isfinite(line["loss"]) and line["seconds"] > 0 for line in lines)
    lrs = [line["lr"] for line in lines]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(1e-3)  # linear warmup over 5 steps
    assert lrs[5] > lrs[20] > lrs[-1]  # then cosine decay


def test_validation_grids_show_the_teacher_above_each_student_schedule(straight_run):
    grids = sorted((straight_run / "validation").iterdir())
    assert [p.name for p in grids] == ["step-000020.png", "step-000040.png"]
    rows = 3  # teacher, 2-step student, 4-step student
    assert Image.open(grids[-1]).height == rows * (LABEL_HEIGHT + MIN_TILE + GAP)


def test_resuming_from_checkpoint_20_ends_where_the_straight_run_ended(straight_run, shapes):
    output = straight_run.parent
    result = invoke("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes,
                    "--max_steps", "40", "--checkpointing_steps", "20", "--output_dir", output,
                    "--run_name", "resumed", "--resume_from_checkpoint", straight_run / "lora" / "checkpoint-20", *FAST)
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "at step 20" in result.output
    _assert_same_weights(_weights(straight_run / "lora" / "final"), _weights(output / "resumed" / "lora" / "final"))


def test_resume_latest_skips_unfinished_checkpoints_and_continues_the_log(straight_run, shapes, tmp_path):
    import shutil

    run = tmp_path / "interrupted"
    shutil.copytree(straight_run / "lora" / "checkpoint-20", run / "lora" / "checkpoint-20")
    (run / "lora" / ".checkpoint-30.tmp-1-dead").mkdir()  # killed while writing
    (run / "lora" / "checkpoint-35").mkdir()  # no training state
    straight_log = (straight_run / "train_log.jsonl").read_text().splitlines()
    (run / "train_log.jsonl").write_text("\n".join(straight_log[:27]) + "\n")  # logged past the checkpoint
    result = invoke("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes,
                    "--max_steps", "40", "--checkpointing_steps", "20", "--output_dir", tmp_path,
                    "--run_name", "interrupted", "--resume_from_checkpoint", "latest", *FAST)
    assert result.exit_code == 0, result.output
    _assert_same_weights(_weights(straight_run / "lora" / "final"), _weights(run / "lora" / "final"))
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_a_second_run_into_the_same_folder_is_refused(straight_run, shapes):
    result = invoke("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes,
                    "--max_steps", "2", "--output_dir", straight_run.parent, "--run_name", "straight", *FAST)
    assert result.exit_code == 2
    assert "already holds an earlier run; pass --resume_from_checkpoint latest" in result.output


def test_bench_runs_the_trained_lora_as_local_student(straight_run, tmp_path):
    final = straight_run / "lora" / "final"
    result = invoke("bench", "--sampler", "local-student", "--lora_path", final, "--steps", "2", "4",
                    "--model", "embedded", "--outdir", tmp_path / "bench", "--warmup", "0", "--repeats", "1", "--quiet")
    assert result.exit_code == 0, result.output
    bench_records = record_json(tmp_path / "bench")
    assert [(r["sampler"], r["steps"], r["status"]) for r in bench_records] == [
        ("local-student", 2, "ok"), ("local-student", 4, "ok")]
    assert str(final) in bench_records[0]["sampler_info"]["lora"]


def test_cached_latents_and_gradient_checkpointing_train_the_same_weights(embedded_model, shapes, tmp_path):
    common = ("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes, "--max_steps", "4",
              "--batch_size", "2", "--output_dir", tmp_path, *FAST)
    assert invoke(*common, "--run_name", "plain").exit_code == 0
    result = invoke(*common, "--run_name", "cached", "--cache_latents", "--gradient_checkpointing")
    assert result.exit_code == 0, result.output
    plain, cached = _weights(tmp_path / "plain" / "lora" / "final"), _weights(tmp_path / "cached" / "lora" / "final")
    for key in plain:
        np.testing.assert_allclose(plain[key].numpy(), cached[key].numpy(), atol=1e-5, err_msg=key)


def test_lora_path_starts_the_student_from_that_lora_with_its_own_scale(embedded_model, shapes, tmp_path):
    from harness.models.embedded import embedded_lora

    start = embedded_lora()  # rank 8, alpha 8: not the --lora_alpha default
    result = invoke("train", "--plugin", "distill", "--model", "embedded", "--data_dir", shapes, "--max_steps", "1",
                    "--learning_rate", "0", "--lora_path", start, "--output_dir", tmp_path, *FAST)
    assert result.exit_code == 0, result.output
    run = tmp_path / "lora_student"
    assert json.loads((run / "config.json").read_text())["resolved"]["lora"]["lora_alpha"] == 8
    _assert_same_weights(_weights(start), _weights(run / "lora" / "final"))


def test_help_lists_the_trainers_options_in_both_spellings_with_the_seeds_defaults():
    result = invoke("train", "--plugin", "distill", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for expected in ("--max-steps, --max_steps", "[default: 2000", "--batch_size", "[default: 1;",
                     "--gradient_accumulation_steps, --grad-accum, --grad_accum", "[default: 4;",
                     "--learning_rate", "[default: 0.0001", "--lora_rank", "--lora_alpha", "[default: 32",
                     "--output_dir", "[default: ./checkpoints]", "--teacher_guidance", "[default: 7.5",
                     "--teacher_steps", "[default: 50", "--student_steps", "[default: 2, 4, 8",
                     "--objective [trajectory|eps]", "--loss [mse|huber]", "--mixed_precision [no|fp16|bf16]"):
        assert expected in text, expected


def test_unknown_or_missing_plugin_lists_the_trainers():
    result = invoke("train", "--plugin", "nope", "--max_steps", "3")
    assert result.exit_code == 2
    assert "unknown trainer 'nope'; known trainers: distill, flash, lcm, pretrain." in result.output
    result = invoke("train", "--max_steps", "3")
    assert result.exit_code == 2 and "installed trainers: distill, flash, lcm, pretrain" in result.output
    assert "Installed trainers: distill, flash, lcm, pretrain." in invoke("train", "--help").output


def test_data_problems_end_in_one_line(tmp_path):
    result = invoke("train", "--plugin", "distill", "--dataset_name", "lambdalabs/pokemon-blip-captions",
                    "--output_dir", tmp_path)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "lambdalabs/naruto-blip-captions" in result.output
    result = invoke("train", "--plugin", "distill", "--output_dir", tmp_path)
    assert result.exit_code == 2 and "exactly one of --dataset_name" in result.output


# ----- the student, reloaded, and whether distillation works -----

@pytest.fixture(scope="module")
def distilled(tmp_path_factory, embedded_model):
    """A short run for the 4-step student on captions of the embedded model's grammar."""
    data = write_dataset(tmp_path_factory.mktemp("grammar") / "data", n=32, seed=0)
    config = DistillConfig(model="embedded", data_dir=str(data), output_dir=str(tmp_path_factory.mktemp("runs")),
                           max_steps=40, batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-4,
                           teacher_steps=10, student_steps=(4,), seed=0, checkpointing_steps=1000)
    trainer = DistillTrainer(config, notify=lambda message: None)
    return trainer, trainer.train()


def _pixels(images):
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


def _images(pipe, scheduler, steps, guidance):
    import torch

    pipe.scheduler = scheduler
    return _pixels([image for prompt in HELD_OUT for image in pipe(
        prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(SEEDS),
        generator=[torch.Generator().manual_seed(seed) for seed in SEEDS]).images])


def _plain_pipeline(model_dir):
    import torch

    # The shipped weights are fp16 files: ask for fp32 on the CPU, as harness does.
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, use_safetensors=True, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_final_lora_reproduces_the_trained_students_pixels_in_plain_diffusers(distilled, embedded_model):
    trainer, final = distilled
    live = _pixels([image for prompt in HELD_OUT
                    for image in trainer.generate(prompt, trainer.student_scheduler(), 4, 0.0, SEEDS)])
    pipe = _plain_pipeline(embedded_model)
    base = _images(pipe, trainer.student_scheduler(), 4, 0.0)
    pipe.load_lora_weights(str(final))
    reloaded = _images(pipe, trainer.student_scheduler(), 4, 0.0)
    assert np.abs(live - reloaded).max() <= 1 / 255
    assert np.abs(live - base).max() > 10 / 255  # the LoRA changed the pixels, so the match means something
    with safe_open(final / "pytorch_lora_weights.safetensors", "pt") as weights:
        metadata = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 32)


def test_distilled_student_is_closer_to_the_guided_50_step_teacher(distilled, embedded_model):
    trainer, final = distilled
    pipe = _plain_pipeline(embedded_model)
    teacher = _images(pipe, trainer.teacher_scheduler(), 50, 7.5)
    undistilled = _images(pipe, trainer.student_scheduler(), 4, 0.0)
    pipe.load_lora_weights(str(final))
    student = _images(pipe, trainer.student_scheduler(), 4, 0.0)
    before, after = np.mean((undistilled - teacher) ** 2), np.mean((student - teacher) ** 2)
    print(f"pixel MSE to the 50-step cfg-7.5 teacher, 4 steps: undistilled {before:.6f}, distilled {after:.6f}")
    assert after < 0.985 * before
