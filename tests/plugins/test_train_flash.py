"""`harness train --plugin flash`: the phased timestep mixture, the one-line refusals, and training with all three
losses (distillation, adversarial, DMD) on the embedded model, checkpoints and resume included."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from harness_plugins.flash import FlashConfig, FlashTrainer
from safetensors.torch import load_file

from harness.lab.dataset import write_dataset
from harness.training.diffusion import NoiseSchedule
from harness.training.lora import LoraTrainer
from tests.conftest import invoke

# ----- the timestep mixture (no model: setup() runs on a stand-in for the loaded UNet) -----


@pytest.fixture
def make_trainer(monkeypatch, embedded_model, tmp_path):
    """A FlashTrainer after its own setup(), with the model loading of LoraTrainer.setup() replaced by the embedded
    model's scheduler config and a stand-in UNet: the solver timesteps and mixture come from the real code."""
    from diffusers import DDIMScheduler

    scheduler_config = DDIMScheduler.load_config(embedded_model / "scheduler")

    def base_setup(self):
        self.scheduler_config = scheduler_config
        self.schedule = NoiseSchedule.from_scheduler_config(scheduler_config, self.device)
        return SimpleNamespace(config=SimpleNamespace(block_out_channels=(32, 64)))

    monkeypatch.setattr(LoraTrainer, "setup", base_setup)

    def make(**settings):
        trainer = FlashTrainer(FlashConfig(data_dir=str(tmp_path), **settings), notify=lambda message: None)
        trainer.device = torch.device("cpu")
        trainer.setup()
        return trainer

    return make


def _mode_masses(trainer, phase):
    """The probability of starting nearest to each mode (solver steps split half-way between modes)."""
    probabilities = trainer.timestep_probabilities(phase)
    locations = trainer.mode_locations
    nearest = [min(range(len(locations)), key=lambda k: abs(index - locations[k]))
               for index in range(len(probabilities))]
    return [float(sum(p for p, k in zip(probabilities, nearest) if k == mode)) for mode in range(len(locations))]


def test_32_solver_steps_and_4_components_put_the_modes_on_the_4_step_schedule(make_trainer):
    from diffusers import DDIMScheduler

    trainer = make_trainer(teacher_steps=32)
    assert len(trainer.solver_timesteps) == 32 and trainer.solver_timesteps[0] == 999
    modes = [trainer.solver_timesteps[index] for index in trainer.mode_locations]
    assert modes == [999, 749, 499, 249]
    four_steps = DDIMScheduler.from_config(trainer.scheduler_config, timestep_spacing="trailing")
    four_steps.set_timesteps(4)
    assert modes == [int(t) for t in four_steps.timesteps]  # a 4-step trailing DDIM schedule


def test_the_mixture_moves_from_the_least_noisy_modes_to_pure_noise(make_trainer):
    trainer = make_trainer(teacher_steps=32)  # the paper's mode probabilities, 4 phases
    for phase in range(4):
        probabilities = trainer.timestep_probabilities(phase)
        assert probabilities.shape == (32,) and bool((probabilities >= 0).all())
        assert float(probabilities.sum()) == pytest.approx(1.0, abs=1e-6)
    warm_up = _mode_masses(trainer, 0)  # weights 0, 0, .5, .5
    assert warm_up[0] + warm_up[1] < 1e-9  # nothing near 999 or 749
    assert warm_up[2] == pytest.approx(0.5, abs=1e-6) and warm_up[3] == pytest.approx(0.5, abs=1e-6)
    assert float(trainer.timestep_probabilities(0)[:12].sum()) < 1e-9
    last = _mode_masses(trainer, 3)  # weights .4, .2, .2, .2
    assert max(range(4), key=lambda mode: last[mode]) == 0
    assert last[0] > 1.4 * max(last[1:])
    assert int(trainer.timestep_probabilities(3).argmax()) == 0  # t = 999 is the likeliest single start


def test_the_phase_follows_phase_steps_and_the_last_one_runs_on(make_trainer):
    trainer = make_trainer(teacher_steps=8, phase_steps=(2, 3, 1), mode_probs=(0, 0, 1, 1) * 3,
                           distill_loss_scale=(1, 1, 1), adversarial_loss_scale=(0, 0.1, 0.2),
                           dmd_loss_scale=(0, 0.3, 0.5))
    phases = []
    for done in range(10):
        trainer.optimizer_steps = done
        phases.append(trainer.phase())
    assert phases == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    trainer.optimizer_steps = 10**6
    assert trainer.phase() == 2


# ----- settings refused in one line, before anything is written -----


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("flash-data") / "data", n=16, seed=0)


ONE_ROW = ("--mode_probs", "1", "1", "1", "1")
BAD_SETTINGS = {
    "distill scales per phase": (("--distill_loss_scale", "1", "1"),
                                 "--distill_loss_scale has 2 value(s) but --phase_steps has 4 phases; give one weight"),
    "adversarial scales per phase": (("--phase_steps", "10", *ONE_ROW, "--distill_loss_scale", "1",
                                      "--adversarial_loss_scale", "0", "0.1", "--dmd_loss_scale", "0"),
                                     "--adversarial_loss_scale has 2 value(s) but --phase_steps has 1 phases"),
    "dmd scales per phase": (("--dmd_loss_scale", "0", "0.3", "0.5"),
                             "--dmd_loss_scale has 3 value(s) but --phase_steps has 4 phases"),
    "mode_probs count": (("--mode_probs", "0.5", "0.5", "0.5"),
                         "--mode_probs has 3 values; it needs 4 phases x 4 --mixture_components = 16"),
    "a phase of zero weights": (("--mode_probs", *"0 0 .5 .5 0 0 0 0 .25 .25 .25 .25 .4 .2 .2 .2".split()),
                                "--mode_probs: phase 2's weights are all zero; give at least one mode a positive"),
    "no discriminator learning rate": (("--discriminator_learning_rate", "0"),
                                       "--adversarial_loss_scale is non-zero but --discriminator_learning_rate is 0"),
    "dmd scales with dmd off": (("--dmd_loss", "off", "--dmd_loss_scale", "0", "1", "1", "1"),
                                "--dmd_loss_scale sets DMD weights but --dmd_loss off switches the term off; drop one"),
    "dmd timesteps reversed": (("--dmd_min_timestep", "980", "--dmd_max_timestep", "980"),
                               "--dmd_min_timestep 980 is not below --dmd_max_timestep 980"),
    "more components than solver steps": (("--teacher_steps", "4", "--mixture_components", "8",
                                           "--mode_probs", *["1"] * 32),
                                          "--mixture_components 8 is more than --teacher_steps 4"),
    "guidance reversed": (("--guidance_min", "9", "--guidance_max", "3"), "--guidance_min 9 is above --guidance_max 3"),
}
# Refused once the model's scheduler is known (setup() loads the embedded model first).
BAD_FOR_THE_MODEL = {
    "teacher steps beyond the scheduler": (("--teacher_steps", "5000"),
                                           "--teacher_steps 5000 is beyond the model's scheduler (1000 training "
                                           "timesteps); pass at most 1000"),
    "discriminator timestep 1000": (("--discriminator_timesteps", "10", "1000"),
                                    "--discriminator_timesteps 10 1000: every timestep must be below the model's 1000"),
}


def _assert_refused(data, tmp_path, options, expected):
    output = tmp_path / "out"
    result = invoke("train", "--plugin", "flash", "--model", "embedded", "--data_dir", data, "--output_dir", output,
                    "--run_name", "refused", "--max_steps", "2", *options)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output, result.output
    assert expected in result.output, result.output
    assert not output.exists()  # no run folder, no lock, no config.json


@pytest.mark.parametrize("options, expected", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_contradictory_settings_are_refused_in_one_line(data, tmp_path, options, expected):
    _assert_refused(data, tmp_path, options, expected)


@pytest.mark.slow
@pytest.mark.parametrize("options, expected", BAD_FOR_THE_MODEL.values(), ids=BAD_FOR_THE_MODEL.keys())
def test_timesteps_beyond_the_models_scheduler_are_refused_in_one_line(embedded_model, data, tmp_path, options,
                                                                       expected):
    _assert_refused(data, tmp_path, options, expected)


# ----- training with all three losses (slow) -----

# Two phases: step 1 is the warm-up (distillation only, modes 999/499 weighted 0/1); steps 2-4 add the adversarial
# and DMD terms, with the discriminator updated on optimizer steps 1 and 3 (odd) and the generator's term on step 2.
STEPS = 4
FLASH = ("--model", "embedded", "--max_steps", STEPS, "--batch_size", "2", "--grad_accum", "1", "--cache_latents",
         "--teacher_steps", "4", "--mixture_components", "2", "--phase_steps", "1", "3",
         "--mode_probs", "0", "1", "0.5", "0.5", "--distill_loss_scale", "1", "1",
         "--adversarial_loss_scale", "0", "0.3", "--dmd_loss_scale", "0", "0.5", "--lora_rank", "4",
         "--lora_alpha", "4", "--learning_rate", "1e-3", "--discriminator_learning_rate", "1e-3",
         "--checkpointing_steps", "1", "--seed", "7")


def _train(data, output, name, *options):
    result = invoke("train", "--plugin", "flash", "--data_dir", data, "--output_dir", output, "--run_name", name,
                    *options)
    return result


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def _state(run, step):
    return load_file(run / "lora" / f"checkpoint-{step}" / "training_state.safetensors")


def _with_prefix(tensors, prefix):
    return {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}


def _head(run, step):
    return _with_prefix(_state(run, step), "extra.discriminator.")


def _refusal(result):
    """The one line a refused resume ends with (after the --cache_latents notice), checked to be the only error."""
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert "Traceback" not in result.output and [line for line in lines if line.startswith("Error:")] == lines[-1:], \
        result.output
    return lines[-1]


def _identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_model, data):
    output = tmp_path_factory.mktemp("flash-runs")
    result = _train(data, output, "straight", *FLASH)
    assert result.exit_code == 0, result.output
    return output / "straight"


@pytest.mark.slow
def test_a_run_with_all_three_losses_writes_the_lora_the_log_and_the_config(straight):
    assert (straight / "lora" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (straight / "lora").iterdir()) == [
        *(f"checkpoint-{step}" for step in range(1, STEPS + 1)), "final"]
    lines = [json.loads(line) for line in (straight / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    config = json.loads((straight / "config.json").read_text())
    assert config["trainer"] == "flash"
    assert config["resolved"]["mixture_modes"] == [999, 499]
    assert config["resolved"]["teacher_solver"] == "DDIM trailing, 4 steps, cfg uniform in [3, 13]"
    # final/ is the last checkpoint's LoRA
    assert _identical(load_file(straight / "lora" / "final" / "pytorch_lora_weights.safetensors"),
                      load_file(straight / "lora" / f"checkpoint-{STEPS}" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_checkpoints_hold_the_step_counter_the_discriminator_and_its_optimizer(straight):
    head_names = set(_head(straight, 1))
    assert head_names and {"layers.0.weight", "layers.5.weight"} <= head_names
    discriminator_updates = {1: 0, 2: 1, 3: 1, 4: 2}  # optimizer steps 1 and 3 (odd, adversarial phase) update it
    for step, updates in discriminator_updates.items():
        state = _state(straight, step)
        assert int(state["extra.flash.optimizer_steps"]) == step
        assert set(_head(straight, step)) == head_names
        optimizer = _with_prefix(state, "extra.discriminator_optimizer.")
        if updates == 0:
            assert not optimizer  # the warm-up phase has no adversarial term: the discriminator never stepped
            continue
        steps = {name: t for name, t in optimizer.items() if name.endswith(".step")}
        assert steps and all(float(t) == updates for t in steps.values()), steps
        assert {name.split(".", 1)[1] for name in optimizer} == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.slow
def test_the_discriminator_head_trains_on_odd_steps_only(straight):
    # Checkpoint 1 holds the freshly initialised head (the warm-up step has no adversarial term).
    assert not _identical(_head(straight, 1), _head(straight, 2))  # step 2: the discriminator's update
    assert _identical(_head(straight, 2), _head(straight, 3))  # step 3: the generator's term leaves the head alone
    assert not _identical(_head(straight, 3), _head(straight, 4))
    # and the student's LoRA moves at every step
    loras = [load_file(straight / "lora" / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
             for step in range(1, STEPS + 1)]
    assert all(not _identical(a, b) for a, b in zip(loras, loras[1:]))


@pytest.mark.slow
def test_resume_latest_from_checkpoint_2_ends_as_the_uninterrupted_run(straight, data, tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(straight / "lora" / "checkpoint-2", run / "lora" / "checkpoint-2")
    log = (straight / "train_log.jsonl").read_text().splitlines()
    (run / "train_log.jsonl").write_text("\n".join(log[:3]) + "\n")  # logged step 3, then killed
    result = _train(data, tmp_path, "interrupted", *FLASH, "--resume_from_checkpoint", "latest")
    assert result.exit_code == 0, result.output
    assert "at step 2" in result.output
    # Bit for bit, as lcm's resume: the LoRA, and the trainer's own state (phase counter, discriminator head and
    # its AdamW moments).
    assert _identical(load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors"),
                      load_file(straight / "lora" / "final" / "pytorch_lora_weights.safetensors"))
    assert _identical(_with_prefix(_state(run, STEPS), "extra."), _with_prefix(_state(straight, STEPS), "extra."))
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert _losses(run) == _losses(straight)


@pytest.mark.slow
def test_resuming_with_another_discriminator_width_is_refused_in_one_line(straight, data, tmp_path):
    result = _train(data, tmp_path, "narrow", *FLASH, "--discriminator_width", "32",
                    "--resume_from_checkpoint", straight / "lora" / "checkpoint-2")
    assert "resume with the --discriminator_width it was trained with" in _refusal(result)
    assert not (tmp_path / "narrow").exists()


@pytest.mark.slow
def test_an_lcm_checkpoint_resumed_with_flash_is_refused_in_one_line(embedded_model, data, tmp_path):
    result = invoke("train", "--plugin", "lcm", "--model", "embedded", "--data_dir", data, "--output_dir", tmp_path,
                    "--run_name", "lcm", "--max_steps", "1", "--batch_size", "1", "--grad_accum", "1",
                    "--num_ddim_timesteps", "1", "--lora_rank", "4", "--lora_alpha", "4", "--checkpointing_steps", "1",
                    "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0",  # as flash: only the trainer differs
                    "--max_train_samples", "2", "--seed", "7")
    assert result.exit_code == 0, result.output
    result = _train(data, tmp_path, "from_lcm", *FLASH, "--resume_from_checkpoint",
                    tmp_path / "lcm" / "lora" / "checkpoint-1")
    refusal = _refusal(result)
    assert "holds no flash trainer state" in refusal and "written by another trainer" in refusal
    assert not (tmp_path / "from_lcm").exists()


# ----- with DMD off and no adversarial weight the loss is the distillation loss alone (slow) -----

# One phase, one step: every run draws the same start timestep, noise and guidance before its first extra term.
ONE_STEP = ("--model", "embedded", "--max_steps", "1", "--batch_size", "2", "--grad_accum", "1", "--cache_latents",
            "--teacher_steps", "4", "--mixture_components", "2", "--phase_steps", "10", "--mode_probs", "1", "1",
            "--lora_rank", "4", "--lora_alpha", "4", "--seed", "7")


@pytest.fixture(scope="module")
def first_losses(tmp_path_factory, embedded_model, data):
    output = tmp_path_factory.mktemp("flash-loss")
    runs = {
        "distill": ("--distill_loss_scale", "1", "--adversarial_loss_scale", "0", "--dmd_loss", "off",
                    "--dmd_loss_scale", "0"),
        "distill_x2": ("--distill_loss_scale", "2", "--adversarial_loss_scale", "0", "--dmd_loss", "off",
                       "--dmd_loss_scale", "0"),
        "with_dmd": ("--distill_loss_scale", "1", "--adversarial_loss_scale", "0", "--dmd_loss_scale", "1"),
        "with_adversarial": ("--distill_loss_scale", "1", "--adversarial_loss_scale", "1", "--dmd_loss", "off",
                             "--dmd_loss_scale", "0"),
    }
    losses = {}
    for name, options in runs.items():
        result = _train(data, output, name, *ONE_STEP, *options)
        assert result.exit_code == 0, result.output
        losses[name] = _losses(output / name)[0]
    return losses


@pytest.mark.slow
def test_without_dmd_and_adversarial_weight_the_loss_is_the_scaled_distillation_loss(first_losses):
    print(f"flash first-step losses: {first_losses}")
    distill = first_losses["distill"]
    assert distill > 0
    # The logged loss is exactly --distill_loss_scale x the distance: no other term rides along.
    assert first_losses["distill_x2"] == pytest.approx(2 * distill, rel=1e-5)
    # Each extra term, switched on, changes it: the comparison above would catch one left on.
    assert first_losses["with_dmd"] > distill * (1 + 1e-4)  # DMD's loss is a squared distance, > 0
    assert first_losses["with_adversarial"] != pytest.approx(distill, rel=1e-4)  # step 1: the generator's term
