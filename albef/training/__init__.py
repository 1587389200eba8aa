"""Training: the momentum teacher and feature queues, the objectives, each task's trainer
(:class:`~albef.training.trainer.Trainer`), and the loop that runs a recipe
(:class:`~albef.training.loop.TrainRun`). The rest of the package never imports this one."""

from albef.training.momentum import FeatureQueue, make_teacher, momentum_update
from albef.training.pretrain import ALBEFPretrainer, PretrainDraws, PretrainOutput
from albef.training.trainer import Trainer

__all__ = [
    "ALBEFPretrainer",
    "FeatureQueue",
    "PretrainDraws",
    "PretrainOutput",
    "Trainer",
    "make_teacher",
    "momentum_update",
]
