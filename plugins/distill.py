"""distill: a few-step LoRA student distilled from its own base model (the seed's ``train_student_lora.py``).

Teacher: the base UNet - the student's UNet with its LoRA switched off, so one copy of the weights - with
classifier-free guidance (``--teacher_guidance``), solved with DDIM (Song et al., 2021, "Denoising Diffusion
Implicit Models") over ``--teacher_steps`` trailing timesteps. Student: the same UNet plus a LoRA, without
guidance, trained only at the timesteps of its own few-step schedule (``--student_steps``): the
LCMScheduler trailing timesteps that ``local-student`` samples with, as Flash Diffusion (Chadebec et al.,
2024, "Flash Diffusion: Accelerating Any Conditional Diffusion Model for Few Steps Image Generation") runs
its LoRA at inference.

Objectives (``--objective``):

- ``trajectory`` (default): progressive distillation (Salimans & Ho, 2022, "Progressive Distillation for
  Fast Sampling of Diffusion Models") with the guidance distilled into the student as in Meng et al., 2023
  ("On Distillation of Guided Diffusion Models"). From a noised latent x_t at a student timestep t, the
  teacher runs its guided solver down to the student's next timestep s (or to the clean latent), and the
  loss compares where one DDIM step of the student from x_t lands with where the teacher landed: the
  student must land there in one step, so each of its steps covers what the teacher needed many guided
  steps for. (Progressive distillation states the same match as a clean-latent target; comparing at s
  weights intervals by how much of x_s the clean latent decides, small at the noisiest student step.)
- ``eps``: the seed's literal description: the student's output matches the guided teacher's output at the
  same x_t and t (one teacher evaluation per step, but the student only learns the guided direction, not
  to jump a whole interval).

``--loss mse`` or ``huber``: the pseudo-Huber loss sqrt(d^2 + c^2) - c of latent consistency models (Luo et
al., 2023, "Latent Consistency Models") after Song & Dhariwal, 2023 ("Improved Techniques for Training
Consistency Models").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import harness
from harness import HarnessError, LoraTrainConfig, LoraTrainer, setting
from harness import lora_distance as distance


@dataclass
class DistillConfig(LoraTrainConfig):
    """Settings of the distill trainer: the teacher, the student's schedules and the objective."""

    teacher_guidance: float = setting(7.5, "Classifier-free guidance scale of the teacher.", minimum=0)
    teacher_steps: int = setting(50, "Steps of the teacher's DDIM solver over the whole schedule.", minimum=1)
    student_steps: tuple[int, ...] = setting(
        (2, 4, 8), "Few-step schedules the student is trained for (several after one flag).", minimum=1)
    objective: str = setting("trajectory", "trajectory: land where the guided teacher solver lands; "
                                           "eps: match the guided teacher's prediction.",
                             choices=("trajectory", "eps"))
    loss: str = setting("mse", "Distance between student and target.", choices=("mse", "huber"))
    huber_c: float = setting(0.001, "The c of the pseudo-Huber loss.", minimum=0)

    def check(self) -> None:
        super().check()
        if not self.student_steps:
            raise HarnessError("--student_steps is empty; give the step counts to train, e.g. --student_steps 2 4 8.")


class DistillTrainer(LoraTrainer):
    name = "distill"
    description = ("Few-step LoRA student distilled from the guided multi-step base model "
                   "(seed's train_student_lora.py; --objective trajectory|eps).")
    config_class = DistillConfig

    def setup(self) -> torch.nn.Module:
        unet = super().setup()
        self.schedules = {steps: self.student_timesteps(steps) for steps in self.config.student_steps}
        self.teacher_timesteps = [int(t) for t in self._teacher_scheduler_timesteps()]
        self._teacher_row = None
        return unet

    def teacher_scheduler(self):
        """The teacher's solver as a pipeline scheduler: DDIM, trailing, ending at the clean latent."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True)

    def _teacher_scheduler_timesteps(self) -> torch.Tensor:
        scheduler = self.teacher_scheduler()
        try:
            scheduler.set_timesteps(self.config.teacher_steps)
        except ValueError as error:
            raise HarnessError(f"--teacher_steps {self.config.teacher_steps}: {error}") from None
        return scheduler.timesteps

    def resolved_settings(self) -> dict:
        return {
            **super().resolved_settings(),
            "student_timesteps": self.schedules,
            "teacher_solver": f"DDIM trailing, {self.config.teacher_steps} steps, cfg {self.config.teacher_guidance:g}",
        }

    def compute_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = self.latents(batch, generator)
        conditions = self.encode_prompts(batch["caption"])
        # One (schedule, interval) per micro-batch keeps the teacher's solver batched.
        steps = self.config.student_steps[_draw(len(self.config.student_steps), generator)]
        interval = _draw(steps, generator)
        t, t_next = self.schedules[steps][interval], self.schedules[steps][interval + 1]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        timesteps = torch.full((latents.shape[0],), t, device=latents.device)
        x_t = self.schedule.add_noise(latents, noise, timesteps)
        with torch.no_grad(), self.base_model() as teacher:
            if self.config.objective == "eps":
                target = self._guided(teacher, x_t, t, conditions)
            else:
                target = self._solve(teacher, x_t, t, t_next, conditions)
        output = self.model(x_t, timesteps, encoder_hidden_states=conditions).sample.float()
        if self.config.objective == "trajectory":
            output = self.schedule.ddim_step(output, x_t, t, t_next)  # where the student's one step lands
        return distance(output, target, self.config.loss, self.config.huber_c)

    def _guided(self, teacher, x: torch.Tensor, t: int, conditions: torch.Tensor) -> torch.Tensor:
        """The teacher's classifier-free-guided output at --teacher_guidance."""
        unconditional, conditional = self.teacher_outputs(
            teacher, x, torch.full((x.shape[0],), t, device=x.device), conditions
        )
        return unconditional + self.config.teacher_guidance * (conditional - unconditional)

    def _solve(self, teacher, x: torch.Tensor, t: int, t_end: int, conditions: torch.Tensor) -> torch.Tensor:
        """Run the teacher's guided DDIM solver from (x, t) down to t_end, through its own timesteps."""
        path = [t, *(u for u in self.teacher_timesteps if t_end < u < t), t_end]
        for current, following in zip(path, path[1:]):
            x = self.schedule.ddim_step(self._guided(teacher, x, current, conditions), x, current, following)
        return x

    def validation_rows(self, prompts, seed):
        """The guided teacher (computed once: it never changes) above the student at each --student_steps."""
        config = self.config
        if self._teacher_row is None:
            with self.base_model():
                images = [
                    self.generate(p, self.teacher_scheduler(), config.teacher_steps, config.teacher_guidance, [seed])[0]
                    for p in prompts
                ]
            self._teacher_row = (f"teacher | {config.teacher_steps} steps | cfg {config.teacher_guidance:g}", images)
        rows = [self._teacher_row]
        for steps in config.student_steps:
            images = [self.generate(p, self.student_scheduler(), steps, 0.0, [seed])[0] for p in prompts]
            rows.append((f"student | {steps} steps | cfg 0", images))
        return rows


def _draw(count: int, generator: torch.Generator) -> int:
    """A uniform integer in [0, count) from the training generator."""
    return int(torch.randint(count, (1,), generator=generator, device=generator.device).item())


@harness.hookimpl
def register_trainers(register):
    register(DistillTrainer)
