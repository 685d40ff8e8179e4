"""lcm: latent consistency distillation of a LoRA (Luo et al., 2023, "Latent Consistency Models" and
"LCM-LoRA: A Universal Stable-Diffusion Acceleration Module").

The teacher is the base UNet (the student's UNet with its LoRA switched off: one copy of the weights). Its
solver is DDIM over ``--num_ddim_timesteps`` of the training schedule, k = num_train_timesteps / N apart
(the skipping-step technique of LCM). Each step draws a solver timestep t_n+k per sample, noises a latent
to it and lets the teacher take one guided DDIM step to t_n. Guidance follows LCM's convention:
eps = eps_cond + w * (eps_cond - eps_uncond), i.e. classifier-free guidance at scale 1 + w, with w drawn
uniformly from [``--w_min``, ``--w_max``] per sample (LCM-LoRA does not condition the student on w).

The student is the consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) of the LoRA UNet,
with the boundary scalings of Song et al., 2023 ("Consistency Models"), c_skip = s^2 / (s^2 + u^2) and
c_out = u / sqrt(s^2 + u^2), s = sigma_data 0.5, u = t * ``--timestep_scaling_factor``. The loss
(``--loss huber``, pseudo-Huber with c = ``--huber_c``, or ``l2``) pulls f(x_t_n+k, t_n+k) towards the target
f(x_t_n, t_n), computed without gradient. By default the target network is the LoRA UNet being trained
(LCM's EMA target with decay 0, as LCM-LoRA trains). ``--use_target_model`` makes it LCM's EMA target
instead: the UNet with an exponential moving average of the LoRA weights, started at the student's initial
weights and moved after every optimizer step, ema = ``--ema_decay`` * ema + (1 - ``--ema_decay``) * lora
(0.95 as LCM's reference script). Only the LoRA trains, so the EMA covers only the LoRA tensors; the
checkpoints keep them, so a resumed run ends as the uninterrupted one. ``final/`` and every checkpoint's
``pytorch_lora_weights.safetensors`` hold the trained (online) LoRA, not the EMA, as LCM-LoRA ships it.
The trained LoRA samples with LCMScheduler, as ``local-student`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import harness
from harness import HarnessError, LoraTrainConfig, LoraTrainer, setting
from harness import lora_distance as distance

#: Few-step schedules shown in validation grids.
VALIDATION_STEPS = (2, 4, 8)
#: The UNet layers LCM-LoRA puts its LoRA on: attention, feed-forward, resnet convolutions and time projections,
#: the down- and upsamplers (diffusers' LCM-LoRA training script, whose SD 1.5 LoRA is rank 64).
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass
class LcmConfig(LoraTrainConfig):
    """Settings of the lcm trainer: the teacher's solver and guidance, the boundary scalings, the loss."""

    lora_rank: int = setting(64, "LoRA rank (LCM-LoRA's 64).", minimum=1)
    lora_alpha: int = setting(64, "LoRA alpha; the LoRA acts at scale alpha / rank (LCM-LoRA's 64: scale 1).",
                              minimum=1)
    lora_target_modules: tuple[str, ...] = setting(
        LCM_LORA_TARGETS, "UNet modules that get a LoRA (several after one flag; default: LCM-LoRA's layers).")
    num_ddim_timesteps: int = setting(50, "Timesteps of the teacher's DDIM solver (it skips "
                                          "num_train_timesteps / N timesteps per step).", minimum=1)
    w_min: float = setting(5.0, "Smallest guidance w of the teacher (LCM convention: cfg scale 1 + w).", minimum=0)
    w_max: float = setting(15.0, "Largest guidance w of the teacher (LCM convention: cfg scale 1 + w).", minimum=0)
    timestep_scaling_factor: float = setting(10.0, "Multiplies t in the c_skip / c_out boundary scalings.",
                                             minimum=0)
    loss: str = setting("huber", "Distance between the student and its target.", choices=("huber", "l2"))
    huber_c: float = setting(0.001, "The c of the pseudo-Huber loss.", minimum=0)
    use_target_model: bool = setting(False, "Compute the target with an EMA of the LoRA weights (LCM's target "
                                            "network) instead of the LoRA being trained.")
    ema_decay: float = setting(0.95, "Decay of the EMA target with --use_target_model, in [0, 1).")

    def check(self) -> None:
        super().check()
        if self.w_min > self.w_max:
            raise HarnessError(f"--w_min {self.w_min:g} is above --w_max {self.w_max:g}.")
        if not 0 <= self.ema_decay < 1:
            raise HarnessError(f"--ema_decay {self.ema_decay:g} is outside [0, 1); pass e.g. 0.95 (LCM's value).")


class LcmTrainer(LoraTrainer):
    name = "lcm"
    description = "Latent consistency distillation of a LoRA (LCM-LoRA; sample it with local-student)."
    config_class = LcmConfig

    def setup(self) -> torch.nn.Module:
        unet = super().setup()
        train_timesteps = len(self.schedule.alphas_cumprod)
        self.skip = train_timesteps // self.config.num_ddim_timesteps
        if self.skip < 1:
            raise HarnessError(f"--num_ddim_timesteps {self.config.num_ddim_timesteps} is above the model's "
                               f"{train_timesteps} training timesteps.")
        # t_n+k = k, 2k, ..., N k, each minus one: the solver's last step starts at the schedule's final timestep.
        self.solver_timesteps = torch.arange(1, self.config.num_ddim_timesteps + 1, device=self.device) * self.skip - 1
        self.ema = harness.EMA(self.config.ema_decay)  # of the LoRA tensors: the target with --use_target_model
        return unet

    def resolved_settings(self) -> dict:
        target = (f"EMA of the LoRA weights, decay {self.config.ema_decay:g}" if self.config.use_target_model
                  else "the trained LoRA without gradient (EMA decay 0)")
        return {**super().resolved_settings(),
                "teacher_solver": f"DDIM, {self.config.num_ddim_timesteps} timesteps {self.skip} apart, "
                                  f"w in [{self.config.w_min:g}, {self.config.w_max:g}] (cfg scale 1 + w)",
                "target_model": target}

    # ----- the EMA target (--use_target_model) -----

    def _lora(self) -> dict[str, torch.nn.Parameter]:
        """The trained (online) LoRA tensors, by their names in the unwrapped UNet."""
        return {name: p for name, p in self.unwrapped_model.named_parameters() if p.requires_grad}

    def _target_weights(self) -> dict[str, torch.Tensor]:
        """The EMA tensors; on first use (a new run) a copy of the student's weights, as LCM starts its target."""
        return self.ema.start(self._lora())

    def after_optimizer_step(self) -> None:
        if self.config.use_target_model:
            self.ema.update(self._lora())  # decay * ema + (1 - decay) * lora

    def extra_state(self) -> dict[str, torch.Tensor]:
        if not self.config.use_target_model:
            return {}
        self._target_weights()
        return self.ema.state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        saved = self.ema.saved_averages(tensors)
        if not self.config.use_target_model:
            if saved:
                raise HarnessError("the checkpoint was trained with --use_target_model (it holds EMA target "
                                   "weights); resume with --use_target_model.")
            return
        lora = self._lora()
        if saved.keys() != lora.keys() or any(saved[name].shape != p.shape for name, p in lora.items()):
            raise HarnessError("the checkpoint holds no EMA target for this LoRA (it was trained without "
                               "--use_target_model); resume without --use_target_model.")
        self.ema.load(tensors, lora)

    def _target_output(self, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The target network's output (call under torch.no_grad); the unwrapped UNet skips DDP's bookkeeping."""
        unet = self.unwrapped_model
        if not self.config.use_target_model:
            return unet(x, t, encoder_hidden_states=conditions).sample.float()
        # The target network is the UNet with the EMA tensors in place of its LoRA tensors. functional_call
        # substitutes them for this one call: no second UNet in memory, no copying weights in and out each
        # step, and the LoRA parameters, which autograd saved from the student's pass for backward, are never
        # written in place (copy_-ing the EMA into them would break that backward pass).
        output = torch.func.functional_call(unet, self._target_weights(), (x, t),
                                            {"encoder_hidden_states": conditions}, strict=False)
        return output.sample.float()

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = self.latents(batch, generator)
        conditions = self.encode_prompts(batch["caption"])
        size, device = latents.shape[0], latents.device
        index = torch.randint(len(self.solver_timesteps), (size,), generator=generator, device=device)
        start = self.solver_timesteps[index]
        end = (start - self.skip).clamp(min=0)
        noise = torch.randn(latents.shape, generator=generator, device=device)
        w = self.config.w_min + (self.config.w_max - self.config.w_min) * torch.rand(
            (size, 1, 1, 1), generator=generator, device=device)
        x_start = self.schedule.add_noise(latents, noise, start)

        scaling = self.config.timestep_scaling_factor
        student = self.schedule.consistency(self.model(x_start, start, encoder_hidden_states=conditions)
                                            .sample.float(), x_start, start, scaling)
        with torch.no_grad():
            with self.base_model() as teacher:
                guided = self._guided(teacher, x_start, start, conditions, w)
            x_end = self.schedule.ddim_step(guided, x_start, start, end)
            target = self.schedule.consistency(self._target_output(x_end, end, conditions), x_end, end, scaling)
        return distance(student, target, self.config.loss, self.config.huber_c)

    def _guided(self, teacher, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
        """The teacher's output guided at LCM's w (linear in the output, so its clean latent and noise alike)."""
        unconditional, conditional = self.teacher_outputs(teacher, x, t, conditions)
        return conditional + w * (conditional - unconditional)

    def validation_rows(self, prompts, seed):
        """The student as local-student samples it, at a few step counts."""
        return [(f"lcm student | {steps} steps | cfg 0",
                 [self.generate(prompt, self.student_scheduler(), steps, 0.0, [seed])[0] for prompt in prompts])
                for steps in VALIDATION_STEPS]


@harness.hookimpl
def register_trainers(register):
    register(LcmTrainer)
