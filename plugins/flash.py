"""flash: Flash Diffusion's training recipe for a few-step LoRA (Chadebec et al., 2024, "Flash Diffusion:
Accelerating Any Conditional Diffusion Model for Few Steps Image Generation", arXiv 2406.02347).

The student (base UNet + LoRA) learns to predict, in one step, what the guided teacher (the same UNet
with the LoRA switched off) reaches in several steps from the same noised latent. Three losses, weighted
per training phase:

- **distillation**: a noised latent x_t at one of the teacher solver's ``--teacher_steps`` timesteps; the
  teacher solves from x_t down to the clean latent with classifier-free guidance drawn uniformly from
  [``--guidance_min``, ``--guidance_max``]; the student's one-step clean latent, through the consistency
  boundary scalings c_skip / c_out of LCM (t scaled by 10), must match it (L2 or L1).
- **timestep schedule**: which solver timestep x_t starts from is drawn from a mixture of
  ``--mixture_components`` Gaussians (variance ``--mixture_var``, in solver-step units) centred on every
  (teacher_steps / components)-th solver timestep: with 32 solver steps and 4 components those are 999,
  749, 499 and 249, the 4-step trailing schedule (local-student's LCMScheduler visits 999, 759, 499,
  259); from 999 it starts at pure noise, as sampling does. The mixture weights (``--mode_probs``, one row
  per phase) shift over the phases (``--phase_steps``): warm-up on the least noisy modes, then mass moves
  toward pure noise, where the student must do most of the work.
- **adversarial** (``--adversarial_loss_scale`` per phase): a discriminator in latent space whose backbone
  is the frozen teacher UNet's encoder (down blocks and mid block; its LoRA off), with a small trainable
  head on the mid block's features. It sees the student's clean latent and a real latent, both re-noised to
  one of ``--discriminator_timesteps``, with the caption. Hinge loss (``--gan_loss``); the discriminator
  has its own AdamW (``--discriminator_learning_rate``) and its head and optimizer state travel in every
  checkpoint. As in the paper's code, generator and discriminator updates alternate: even steps add the
  generator's term, odd steps update the discriminator.
- **distribution matching** (DMD, Yin et al., 2024, "One-step Diffusion with Distribution Matching
  Distillation"; ``--dmd_loss on|off``, ``--dmd_loss_scale`` per phase): the student's clean latent is
  re-noised at t uniform in [``--dmd_min_timestep``, ``--dmd_max_timestep``] (DMD's 0.02 T to 0.98 T) and
  pushed along the difference between the clean latent the student itself ("fake" score: its own
  conditional prediction, as Flash Diffusion does instead of training a second score network) and the
  guided teacher ("real" score) infer from it, normalised by the mean distance to the teacher's.

Defaults are the paper's released SD 1.5 configuration (4 phases of 5,000 steps, mode probabilities
[0, 0, .5, .5], [.1, .3, .3, .3], [.25] * 4, [.4, .2, .2, .2], adversarial scales 0/.1/.2/.3, DMD scales
0/.3/.5/.7, guidance 3-13, 32 solver steps, learning rates 1e-5), except where "The flash trainer" of
docs/guides/training.md says otherwise and why (the teacher's solver is DDIM rather than DPM-Solver++, the distillation
loss L2 rather than LPIPS, which needs VGG weights from the network, the default GAN loss is the paper
code's default hinge rather than the SD 1.5 config's LSGAN, which ``--gan_loss lsgan`` gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import harness
from harness import CLEAN, HarnessError, LoraTrainConfig, LoraTrainer, setting

TIMESTEP_SCALING = 10.0  # the paper's boundary scalings use t / 0.1
PAPER_MODE_PROBS = (0.0, 0.0, 0.5, 0.5, 0.1, 0.3, 0.3, 0.3, 0.25, 0.25, 0.25, 0.25, 0.4, 0.2, 0.2, 0.2)
PAPER_DMD_SCALES = (0.0, 0.3, 0.5, 0.7)
#: Few-step schedules shown in validation grids.
VALIDATION_STEPS = (1, 2, 4)


@dataclass
class FlashConfig(LoraTrainConfig):
    """Settings of the flash trainer: phases, the teacher, and the three losses (see the module docstring)."""

    learning_rate: float = setting(1e-5, "AdamW learning rate of the LoRA (the paper's 1e-5).", minimum=0)
    lora_rank: int = setting(128, "LoRA rank (the paper's SD 1.5 LoRA: 128).", minimum=1)
    lora_alpha: int = setting(128, "LoRA alpha; the LoRA acts at scale alpha / rank.", minimum=1)
    teacher_steps: int = setting(32, "Timesteps of the teacher's guided DDIM solver (the paper's K = 32).", minimum=1)
    guidance_min: float = setting(3.0, "Smallest classifier-free guidance of the teacher.", minimum=0)
    guidance_max: float = setting(13.0, "Largest classifier-free guidance of the teacher.", minimum=0)
    phase_steps: tuple[int, ...] = setting((5000, 5000, 5000, 5000), "Optimizer steps of each training phase "
                                                                      "(the last phase runs on after its end).",
                                           minimum=1)
    mixture_components: int = setting(4, "Gaussians of the timestep mixture, centred on every "
                                         "(teacher_steps / components)-th solver timestep.", minimum=1)
    mixture_var: float = setting(0.5, "Variance of each Gaussian, in solver steps squared.", minimum=0)
    mode_probs: tuple[float, ...] = setting(PAPER_MODE_PROBS, "Mixture weights, one row of --mixture_components "
                                                              "values per phase, rows one after another.",
                                            minimum=0)
    distill_loss: str = setting("l2", "Distance of the student's clean latent to the teacher's.",
                                choices=("l2", "l1"))
    distill_loss_scale: tuple[float, ...] = setting((1.0, 1.0, 1.0, 1.0), "Weight of the distillation loss per "
                                                                           "phase.", minimum=0)
    adversarial_loss_scale: tuple[float, ...] = setting((0.0, 0.1, 0.2, 0.3), "Weight of the generator's "
                                                                              "adversarial loss per phase.", minimum=0)
    gan_loss: str = setting("hinge", "hinge (the paper code's default) or lsgan (its SD 1.5 configuration).",
                            choices=("hinge", "lsgan"))
    discriminator_learning_rate: float = setting(1e-5, "AdamW learning rate of the discriminator's head.",
                                                 minimum=0)
    discriminator_timesteps: tuple[int, ...] = setting((10, 250, 500, 750), "Timesteps the discriminator's "
                                                                            "inputs are re-noised to (uniformly).",
                                                       minimum=0)
    discriminator_width: int = setting(64, "Channels of the discriminator head's first layer (the paper's 64).",
                                       minimum=1)
    dmd_loss: str = setting("on", "The distribution-matching term.", choices=("on", "off"))
    dmd_loss_scale: tuple[float, ...] = setting(PAPER_DMD_SCALES, "Weight of the DMD loss per phase.", minimum=0)
    dmd_min_timestep: int = setting(20, "Smallest re-noising timestep of the DMD term (DMD's 0.02 T).", minimum=0)
    dmd_max_timestep: int = setting(980, "Largest re-noising timestep of the DMD term (DMD's 0.98 T).", minimum=0)

    def check(self) -> None:
        super().check()
        phases = len(self.phase_steps)
        scales = ["distill_loss_scale", "adversarial_loss_scale"]
        if self.dmd_loss == "on" or self.dmd_loss_scale != PAPER_DMD_SCALES:
            scales.append("dmd_loss_scale")
        for name in scales:
            if len(getattr(self, name)) != phases:
                raise HarnessError(f"--{name} has {len(getattr(self, name))} value(s) but --phase_steps has {phases} "
                                   f"phases; give one weight per phase.")
        if len(self.mode_probs) != phases * self.mixture_components:
            raise HarnessError(f"--mode_probs has {len(self.mode_probs)} values; it needs {phases} phases x "
                               f"{self.mixture_components} --mixture_components = {phases * self.mixture_components}.")
        for phase, row in enumerate(self.mode_rows(), start=1):
            if sum(row) <= 0:
                raise HarnessError(f"--mode_probs: phase {phase}'s weights are all zero; give at least one mode "
                                   "a positive weight.")
        if self.mixture_components > self.teacher_steps:
            raise HarnessError(f"--mixture_components {self.mixture_components} is more than --teacher_steps "
                               f"{self.teacher_steps}; each mode needs its own solver timestep.")
        if self.guidance_min > self.guidance_max:
            raise HarnessError(f"--guidance_min {self.guidance_min:g} is above --guidance_max {self.guidance_max:g}.")
        if any(self.adversarial_loss_scale):
            if self.discriminator_learning_rate == 0:
                raise HarnessError("--adversarial_loss_scale is non-zero but --discriminator_learning_rate is 0: "
                                   "the discriminator would never learn; give it a learning rate (e.g. 1e-5) or "
                                   "set --adversarial_loss_scale to zeros.")
            if not self.discriminator_timesteps:
                raise HarnessError("--adversarial_loss_scale is non-zero but --discriminator_timesteps is empty; "
                                   "give e.g. --discriminator_timesteps 10 250 500 750.")
        if self.dmd_loss == "off" and self.dmd_loss_scale != PAPER_DMD_SCALES and any(self.dmd_loss_scale):
            raise HarnessError("--dmd_loss_scale sets DMD weights but --dmd_loss off switches the term off; "
                               "drop one of them.")
        if self.dmd_loss == "on" and self.dmd_min_timestep >= self.dmd_max_timestep:
            raise HarnessError(f"--dmd_min_timestep {self.dmd_min_timestep} is not below --dmd_max_timestep "
                               f"{self.dmd_max_timestep}.")

    def mode_rows(self) -> list[tuple[float, ...]]:
        size = self.mixture_components
        return [self.mode_probs[i : i + size] for i in range(0, len(self.mode_probs), size)]


class DiscriminatorHead(torch.nn.Module):
    """The paper's head on the encoder's last features (conv 3x3, conv 4x4 stride 2, GroupNorm, conv), with a
    1x1 last convolution and a spatial mean so that it fits any feature-map size (2x2 on the embedded model)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, 1, 1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), torch.nn.SiLU(),
            torch.nn.GroupNorm(4 if width * 2 % 4 == 0 else 1, width * 2),
            torch.nn.Conv2d(width * 2, 1, 1, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).mean(dim=(1, 2, 3))


def encoder_features(unet, sample: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The mid block's output of a UNet2DConditionModel: its encoder (down blocks and mid block) alone."""
    embedding = unet.time_embedding(unet.time_proj(timesteps).to(sample.dtype))
    hidden = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=embedding, encoder_hidden_states=states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=embedding)
    return unet.mid_block(hidden, embedding, encoder_hidden_states=states)


class FlashTrainer(LoraTrainer):
    name = "flash"
    description = ("Flash Diffusion (Chadebec et al. 2024): one-step match of the guided multi-step teacher, phased "
                   "timestep mixture, latent adversarial loss on the teacher's encoder, DMD.")
    config_class = FlashConfig
    config: FlashConfig

    def setup(self) -> torch.nn.Module:
        unet = super().setup()
        config = self.config
        train_timesteps = len(self.schedule.alphas_cumprod)
        if config.teacher_steps > train_timesteps:
            raise HarnessError(f"--teacher_steps {config.teacher_steps} is beyond the model's scheduler "
                               f"({train_timesteps} training timesteps); pass at most {train_timesteps}, e.g. 32.")
        if any(t >= train_timesteps for t in config.discriminator_timesteps):
            raise HarnessError(f"--discriminator_timesteps {' '.join(map(str, config.discriminator_timesteps))}: "
                               f"every timestep must be below the model's {train_timesteps}.")
        if config.dmd_loss == "on" and config.dmd_max_timestep >= train_timesteps:
            raise HarnessError(f"--dmd_max_timestep {config.dmd_max_timestep} must be below the model's "
                               f"{train_timesteps} training timesteps.")
        scheduler = self.teacher_scheduler()
        scheduler.set_timesteps(config.teacher_steps)
        self.solver_timesteps = [int(t) for t in scheduler.timesteps]
        modes = config.mixture_components
        self.mode_locations = [i * (config.teacher_steps // modes) for i in range(modes)]
        channels = unet.config.block_out_channels[-1]
        self.discriminator = DiscriminatorHead(channels, config.discriminator_width).to(self.device)
        self.discriminator_optimizer = torch.optim.AdamW(self.discriminator.parameters(),
                                                         lr=config.discriminator_learning_rate)
        self.optimizer_steps = 0  # restored from checkpoints: the phase and the G/D alternation depend on it
        return unet

    def teacher_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True)

    def resolved_settings(self) -> dict[str, Any]:
        config = self.config
        head_size = sum(p.numel() for p in self.discriminator.parameters())
        return {
            **super().resolved_settings(),
            "teacher_solver": f"DDIM trailing, {config.teacher_steps} steps, cfg uniform in "
                              f"[{config.guidance_min:g}, {config.guidance_max:g}]",
            "mixture_modes": [self.solver_timesteps[i] for i in self.mode_locations],
            "discriminator": f"frozen teacher encoder + head ({head_size} parameters), {config.gan_loss} loss",
        }

    # ----- the phases -----

    def phase(self) -> int:
        """The phase of the optimizer step being taken (0-based; the last phase runs on)."""
        done = self.optimizer_steps
        for index, length in enumerate(self.config.phase_steps):
            if done < length:
                return index
            done -= length
        return len(self.config.phase_steps) - 1

    def timestep_probabilities(self, phase: int) -> torch.Tensor:
        """The probability of starting from each solver timestep in ``phase``: the mixture of the paper."""
        config = self.config
        weights = config.mode_rows()[phase]
        index = torch.arange(config.teacher_steps, dtype=torch.float64)
        density = sum(weight * torch.exp(-((index - location) ** 2) / max(config.mixture_var, 1e-12))
                      for weight, location in zip(weights, self.mode_locations))
        return (density / density.sum()).float()

    # ----- the losses -----

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        config = self.config
        phase = self.phase()
        latents = self.latents(batch, generator)
        conditions = self.encode_prompts(batch["caption"])
        size, device = latents.shape[0], latents.device
        probabilities = self.timestep_probabilities(phase).to(device)
        start = int(torch.multinomial(probabilities, 1, generator=generator).item())
        t = self.solver_timesteps[start]
        timesteps = torch.full((size,), t, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        # From the first solver timestep the paper's code starts at pure noise, as sampling does (the same as
        # noising the latent on a zero-terminal-SNR schedule; not on SD 1.5's, which leaves some signal).
        x_t = noise if start == 0 else self.schedule.add_noise(latents, noise, timesteps)
        guidance = config.guidance_min + (config.guidance_max - config.guidance_min) * float(
            torch.rand(1, generator=generator, device=device).item())

        with torch.no_grad(), self.base_model() as teacher:
            target = self._solve(teacher, x_t, self.solver_timesteps[start:], conditions, guidance)
        student = self.schedule.consistency(self.model(x_t, timesteps, encoder_hidden_states=conditions)
                                            .sample.float(), x_t, timesteps, TIMESTEP_SCALING)
        difference = student - target
        loss = config.distill_loss_scale[phase] * (difference.abs().mean() if config.distill_loss == "l1"
                                                   else difference.pow(2).mean())
        if config.dmd_loss == "on" and config.dmd_loss_scale[phase] > 0:
            loss = loss + config.dmd_loss_scale[phase] * self._dmd(student, conditions, guidance, generator)
        if config.adversarial_loss_scale[phase] > 0:
            loss = loss + config.adversarial_loss_scale[phase] * self._adversarial(student, latents, conditions,
                                                                                   generator)
        return loss

    def _guided(self, teacher, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                guidance: float) -> torch.Tensor:
        unconditional, conditional = self.teacher_outputs(teacher, x, t, conditions)
        return unconditional + guidance * (conditional - unconditional)

    def _solve(self, teacher, x: torch.Tensor, path: list[int], conditions: torch.Tensor,
               guidance: float) -> torch.Tensor:
        """The guided teacher's DDIM solver from ``path[0]`` through the rest of ``path`` to the clean latent."""
        for current, following in zip(path, [*path[1:], CLEAN]):
            t = torch.full((x.shape[0],), current, device=x.device)
            x = self.schedule.ddim_step(self._guided(teacher, x, t, conditions, guidance), x, current, following)
        return x

    def _dmd(self, student: torch.Tensor, conditions: torch.Tensor, guidance: float,
             generator: torch.Generator) -> torch.Tensor:
        """DMD's loss: its gradient moves the student's latent by (fake x0 - real x0), normalised."""
        config = self.config
        size, device = student.shape[0], student.device
        t = torch.randint(config.dmd_min_timestep, config.dmd_max_timestep + 1, (size,), generator=generator,
                          device=device)
        noise = torch.randn(student.shape, generator=generator, device=device)
        noisy = self.schedule.add_noise(student.detach(), noise, t)
        with torch.no_grad():
            with self.base_model() as teacher:
                real = self.schedule.to_clean(self._guided(teacher, noisy, t, conditions, guidance), noisy, t)
            fake = self.schedule.to_clean(self.unwrapped_model(noisy, t, encoder_hidden_states=conditions)
                                          .sample.float(), noisy, t)
            weight = 1.0 / ((student - real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
            target = student - weight * (fake - real)
        return F.mse_loss(student, target)

    def _renoise(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = torch.tensor(self.config.discriminator_timesteps, device=latents.device)
        pick = torch.randint(len(timesteps), (latents.shape[0],), generator=generator, device=latents.device)
        t = timesteps[pick]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        return self.schedule.add_noise(latents, noise, t), t

    def _critic(self, sample: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        with self.base_model() as teacher:
            return self.discriminator(encoder_features(teacher, sample, t, conditions).float())

    def _adversarial(self, student: torch.Tensor, latents: torch.Tensor, conditions: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
        """The generator's term on even steps; on odd steps, one discriminator update and no term."""
        noisy_fake, t = self._renoise(student, generator)
        if self.optimizer_steps % 2 == 0:
            logits = self._critic(noisy_fake, t, conditions)
            if self.config.gan_loss == "lsgan":
                return F.mse_loss(torch.sigmoid(logits), torch.ones_like(logits))
            return -logits.mean()
        noisy_real, t_real = self._renoise(latents, generator)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), self.base_model() as teacher:
            fake_features = encoder_features(teacher, noisy_fake.detach(), t, conditions).float()
            real_features = encoder_features(teacher, noisy_real, t_real, conditions).float()
        fake_logits, real_logits = self.discriminator(fake_features), self.discriminator(real_features)
        if self.config.gan_loss == "lsgan":
            loss = 0.5 * (F.mse_loss(torch.sigmoid(real_logits), torch.ones_like(real_logits))
                          + F.mse_loss(torch.sigmoid(fake_logits), torch.zeros_like(fake_logits)))
        else:
            loss = F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
        loss.backward()
        if self.accelerator.num_processes > 1:
            for parameter in self.discriminator.parameters():
                if parameter.grad is not None:
                    torch.distributed.all_reduce(parameter.grad)
                    parameter.grad /= self.accelerator.num_processes
        self.discriminator_optimizer.step()
        return student.new_zeros(())

    # ----- state that travels in checkpoints -----

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1

    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"flash.optimizer_steps": torch.tensor(self.optimizer_steps)}
        state |= {f"discriminator.{name}": tensor for name, tensor in self.discriminator.state_dict().items()}
        optimizer = self.discriminator_optimizer.state_dict()
        for index, values in optimizer["state"].items():
            for key, tensor in values.items():
                state[f"discriminator_optimizer.{index}.{key}"] = torch.as_tensor(tensor)
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "flash.optimizer_steps" not in tensors:
            raise HarnessError("the checkpoint holds no flash trainer state (discriminator, phase); it was written by "
                               "another trainer: resume it with that trainer, or start a new --run_name.")
        self.optimizer_steps = int(tensors["flash.optimizer_steps"])
        head = {name.removeprefix("discriminator."): tensor for name, tensor in tensors.items()
                if name.startswith("discriminator.")}
        optimizer = self.discriminator_optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if name.startswith("discriminator_optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = tensor.to(self.device) if key != "step" else tensor
        optimizer["state"] = state
        # A head of another shape (--discriminator_width) ends in one line, not in load_state_dict's traceback.
        own = self.discriminator.state_dict()
        if head.keys() != own.keys() or any(head[name].shape != own[name].shape for name in own):
            raise HarnessError("the checkpoint's discriminator head has other shapes than this run's; resume with "
                               "the --discriminator_width it was trained with.")
        self.discriminator.load_state_dict({name: tensor.to(self.device) for name, tensor in head.items()})
        self.discriminator_optimizer.load_state_dict(optimizer)

    def validation_rows(self, prompts, seed):
        """The student as local-student samples it, at 1, 2 and 4 steps."""
        return [(f"flash student | {steps} steps | cfg 0",
                 [self.generate(prompt, self.student_scheduler(), steps, 0.0, [seed])[0] for prompt in prompts])
                for steps in VALIDATION_STEPS]


@harness.hookimpl
def register_trainers(register):
    register(FlashTrainer)
