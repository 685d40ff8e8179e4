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
pulls f(x_t_n+k, t_n+k) towards the target f(x_t_n, t_n) computed by the same LoRA UNet without gradient
(LCM's EMA target with decay 0, as LCM-LoRA trains): ``--loss huber`` (pseudo-Huber, c = ``--huber_c``) or
``l2``. The trained LoRA samples with LCMScheduler, as ``local-student`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import harness
from harness.errors import HarnessError
from harness.training import LoraTrainConfig, LoraTrainer, setting
from harness.training.lora import distance

SIGMA_DATA = 0.5
#: Few-step schedules shown in validation grids.
VALIDATION_STEPS = (2, 4, 8)


@dataclass
class LcmConfig(LoraTrainConfig):
    """Settings of the lcm trainer: the teacher's solver and guidance, the boundary scalings, the loss."""

    num_ddim_timesteps: int = setting(50, "Timesteps of the teacher's DDIM solver (it skips "
                                          "num_train_timesteps / N timesteps per step).", minimum=1)
    w_min: float = setting(5.0, "Smallest guidance w of the teacher (LCM convention: cfg scale 1 + w).", minimum=0)
    w_max: float = setting(15.0, "Largest guidance w of the teacher (LCM convention: cfg scale 1 + w).", minimum=0)
    timestep_scaling_factor: float = setting(10.0, "Multiplies t in the c_skip / c_out boundary scalings.",
                                             minimum=0)
    loss: str = setting("huber", "Distance between the student and its target.", choices=("huber", "l2"))
    huber_c: float = setting(0.001, "The c of the pseudo-Huber loss.", minimum=0)

    def check(self) -> None:
        super().check()
        if self.w_min > self.w_max:
            raise HarnessError(f"--w_min {self.w_min:g} is above --w_max {self.w_max:g}.")


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
        return unet

    def resolved_settings(self) -> dict:
        return {**super().resolved_settings(),
                "teacher_solver": f"DDIM, {self.config.num_ddim_timesteps} timesteps {self.skip} apart, "
                                  f"w in [{self.config.w_min:g}, {self.config.w_max:g}] (cfg scale 1 + w)"}

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

        student = self._consistency(self.model(x_start, start, encoder_hidden_states=conditions).sample.float(),
                                    x_start, start)
        with torch.no_grad():
            with self.base_model() as teacher:
                guided = self._guided(teacher, x_start, start, conditions, w)
            x_end = self.schedule.ddim_step(guided, x_start, start, end)
            # The target network is the student itself; the unwrapped UNet skips DDP's gradient bookkeeping.
            target_output = self.unwrapped_model(x_end, end, encoder_hidden_states=conditions).sample.float()
            target = self._consistency(target_output, x_end, end)
        return distance(student, target, self.config.loss, self.config.huber_c)

    def _guided(self, teacher, x: torch.Tensor, t: torch.Tensor, conditions: torch.Tensor,
                w: torch.Tensor) -> torch.Tensor:
        """The teacher's output guided at LCM's w (linear in the output, so its clean latent and noise alike)."""
        unconditional, conditional = self.teacher_outputs(teacher, x, t, conditions)
        return conditional + w * (conditional - unconditional)

    def _consistency(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip x + c_out x0: the identity at t = 0, the model's clean latent at large t."""
        scaled = (t.float() * self.config.timestep_scaling_factor).view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip * x + c_out * self.schedule.to_clean(output, x, t)

    def validation_rows(self, prompts, seed):
        """The student as local-student samples it, at a few step counts."""
        return [(f"lcm student | {steps} steps | cfg 0",
                 [self.generate(prompt, self.student_scheduler(), steps, 0.0, [seed])[0] for prompt in prompts])
                for steps in VALIDATION_STEPS]


@harness.hookimpl
def register_trainers(register):
    register(LcmTrainer)
