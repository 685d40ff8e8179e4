"""One exponential moving average of a model's trained tensors, for every trainer that keeps one.

lcm keeps one as LCM's target network (a fixed decay, 0.95 in LCM's reference script); pretrain saves and
judges one of the UNet and text encoder, its decay warmed up as ``(1 + n) / (10 + n)`` (the warmup of
diffusers' ``EMAModel``) so the first updates do not average in the initial weights for thousands of steps.
Its state goes into every checkpoint (``state()`` / ``load()``), so a resumed run ends as an uninterrupted
one does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from harness.errors import HarnessError

PREFIX = "ema."
UPDATES = "ema_updates"


class EMA:
    """``average = decay * average + (1 - decay) * weight`` after every optimizer step, per named tensor.

    The average starts as a copy of the weights at the first :meth:`update` (or :meth:`start`).
    """

    def __init__(self, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.averages: dict[str, torch.Tensor] = {}
        self.updates = 0

    def __bool__(self) -> bool:
        return bool(self.averages)

    def start(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averages, made from ``weights`` if there are none yet."""
        if not self.averages:
            self.averages = {name: weight.detach().clone() for name, weight in weights.items()}
        return self.averages

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, weights: Mapping[str, torch.Tensor]) -> None:
        """One step of the average towards ``weights`` (the same names as the averages)."""
        averages = self.start(weights)
        self.updates += 1
        names = list(averages)
        # One fused call over all tensors (torch's private foreach API, which its optimizers use): a Python loop
        # launches a kernel per tensor, which bounds a small model's step on a GPU.
        torch._foreach_lerp_([averages[name] for name in names], [weights[name].detach() for name in names],
                             1 - self.current_decay())

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps for it (none before the first update)."""
        if not self.averages:
            return {}
        return {UPDATES: torch.tensor(self.updates),
                **{PREFIX + name: average.detach().cpu() for name, average in self.averages.items()}}

    @staticmethod
    def saved_averages(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averages among a checkpoint's extra tensors, by name."""
        return {name[len(PREFIX):]: tensor for name, tensor in tensors.items() if name.startswith(PREFIX)}

    def load(self, tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> None:
        """Take back what :meth:`state` saved, each average on the device and in the dtype of its weight."""
        saved = self.saved_averages(tensors)
        if saved.keys() != like.keys() or any(saved[name].shape != weight.shape for name, weight in like.items()):
            raise HarnessError("the checkpoint's moving average is not one of these weights (another model or "
                               "LoRA); resume from a checkpoint of this run, or start a new run.")
        self.updates = int(tensors[UPDATES]) if UPDATES in tensors else 0
        self.averages = {name: saved[name].to(weight.device, weight.dtype) for name, weight in like.items()}

    @contextmanager
    def swapped_into(self, parameters: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
        """The averages in place of ``parameters`` while the block runs (nothing without averages yet)."""
        if not self.averages:
            yield
            return
        trained = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(self.averages[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(trained[name])
