"""What the training loop knows of every task's training module.

Each task's trainer (pretraining, retrieval, VQA, SNLI-VE/NLVR2, text assignment) holds the
student it trains and states what else it has: an EMA teacher (``model_m``, None without
distillation), a feature queue (``queue``, None without ITC) and the encoders that gradient
checkpointing and ``torch.compile`` apply to. The loop reads these and probes nothing.
"""

from __future__ import annotations

from torch import nn

from albef.training.momentum import FeatureQueue


class Trainer(nn.Module):
    """A student, and optionally its EMA teacher (updated at ``momentum``) and feature queue.

    ``ENCODERS``: the attribute names of the model's encoders (subclasses with a decoder add it).
    """

    ENCODERS: tuple[str, ...] = ("visual_encoder", "text_encoder")

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None = None,
        queue: FeatureQueue | None = None,
        momentum: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.model_m = teacher
        self.queue = queue
        self.momentum = momentum

    def encoders(self) -> list[nn.Module]:
        """The student's encoders, then the teacher's."""
        owners = [self.model] if self.model_m is None else [self.model, self.model_m]
        return [getattr(owner, name) for owner in owners for name in self.ENCODERS]
