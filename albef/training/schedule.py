"""Learning-rate and α schedules, as pure functions of (epoch, step in epoch).

Being pure functions, they need no state of their own in a checkpoint: a resumed run recomputes
them from where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    """``style="albef"`` (default) is the authors' schedule, step for step:

    * epoch 0: ``warmup_lr`` at the first iteration, then every ``step_size`` (100) iterations
      the lr climbs linearly, reaching ``lr`` after ``warmup_epochs * step_size`` iterations (the
      authors' timm scheduler stepped with ``i // 100`` during the first epoch);
    * epoch ``e ≥ 1``: constant within the epoch, ``min_lr + (lr − min_lr)(1 + cos(π e / epochs)) / 2``.

    ``style="cosine"`` is the common per-step variant: linear warm-up from ``warmup_lr`` over
    ``warmup_steps`` optimizer steps, then a cosine from ``lr`` to ``min_lr`` over the rest.

    Example:
        >>> s = LRSchedule(lr=1e-4, min_lr=1e-5, warmup_lr=1e-5, warmup_epochs=20, epochs=30)
        >>> round(s(0, 2000), 8), round(s(0, 2001), 8), round(s(1, 0), 9)
        (9.55e-05, 0.0001, 9.9753e-05)
    """

    lr: float
    min_lr: float
    warmup_lr: float
    warmup_epochs: int = 20
    epochs: int = 30
    step_size: int = 100
    style: str = "albef"
    warmup_steps: int = 0
    steps_per_epoch: int = 1
    total_steps: int | None = None  # cosine style: where the decay ends (default epochs x steps_per_epoch)

    def __post_init__(self) -> None:
        if self.style not in ("albef", "cosine"):
            raise ValueError(f"lr schedule style must be 'albef' or 'cosine', not {self.style!r}")

    def _cosine(self, progress: float) -> float:
        if progress >= 1:
            return self.min_lr
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def __call__(self, epoch: int, step: int) -> float:
        if self.style == "cosine":
            t = epoch * self.steps_per_epoch + step
            if t < self.warmup_steps:
                return self.warmup_lr + (self.lr - self.warmup_lr) * t / self.warmup_steps
            total = max(1, (self.total_steps or self.epochs * self.steps_per_epoch) - self.warmup_steps)
            return self._cosine((t - self.warmup_steps) / total)
        if epoch > 0:
            return self._cosine(epoch / self.epochs)
        if step == 0 or self.warmup_epochs == 0:
            return self.warmup_lr if self.warmup_epochs else self.lr
        k = min((step - 1) // self.step_size, self.warmup_epochs)
        if k >= self.warmup_epochs:
            return self.lr
        return self.warmup_lr + k * (self.lr - self.warmup_lr) / self.warmup_epochs


def alpha_at(alpha: float, epoch: int, step: int, steps_per_epoch: int, ramp_epochs: float = 1.0) -> float:
    """Distillation weight: ramped linearly from 0 over the first ``ramp_epochs`` epochs.

    ``ramp_epochs=1`` is the authors' ``alpha * min(1, i / len(loader))`` in epoch 0; LAVIS ramps
    over 2 for pretraining, retrieval and NLVR2; 0 turns the ramp off.
    """
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))
