"""Training-only parts: momentum teacher, feature queues, objectives, the pretraining wrapper."""

from albef.training.momentum import FeatureQueue, make_teacher, momentum_update
from albef.training.pretrain import ALBEFPretrainer, PretrainDraws, PretrainOutput

__all__ = ["ALBEFPretrainer", "FeatureQueue", "PretrainDraws", "PretrainOutput", "make_teacher", "momentum_update"]
