"""Momentum (EMA) teacher and the ITC feature queues."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from albef.models.albef import ALBEF


def make_teacher(student: ALBEF) -> ALBEF:
    """A frozen copy of the student's encoders, projections and MLM head.

    The reference keeps momentum twins of exactly these (``visual_encoder_m``, ``vision_proj_m``,
    ``text_encoder_m`` with its MLM head, ``text_proj_m``); the ITM head and the temperature
    have none, so the copy drops them.
    """
    teacher = copy.deepcopy(student)
    teacher.itm_head = None
    teacher.temp = None
    for p in teacher.parameters():
        p.grad = None
    return teacher.requires_grad_(False)


@torch.no_grad()
def momentum_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``θ_m ← m·θ_m + (1 − m)·θ`` for every teacher parameter, matched by name."""
    from albef.training.fsdp import local  # FSDP: matching shards, updated where they live

    student_params = dict(student.named_parameters())
    t = [local(p) for _, p in teacher.named_parameters()]
    s = [local(student_params[name]) for name, _ in teacher.named_parameters()]
    # θ_m + (1 − m)(θ − θ_m): one pass over both models instead of a multiply pass and an add pass
    torch._foreach_lerp_(t, s, 1.0 - momentum)


@torch.no_grad()
def copy_student_to_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Set every teacher parameter equal to the student's parameter of the same name."""
    params = dict(student.named_parameters())
    for name, p in teacher.named_parameters():
        p.copy_(params[name])


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class FeatureQueue(nn.Module):
    """MoCo-style queues of momentum features, [embed_dim, size] as in the reference.

    ``enqueue`` writes the features of the whole global batch (gathered from every rank) at
    ``queue_ptr``; the size must be a multiple of the global batch so a write never wraps.
    With ``with_idx`` it also keeps the image id of every entry (retrieval fine-tuning).
    """

    def __init__(self, embed_dim: int, size: int, with_idx: bool = False):
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, size), dim=0))
        if with_idx:
            self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))
        else:
            self.idx_queue = None
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat: Tensor, text_feat: Tensor, idx: Tensor | None = None) -> None:
        image_feat, text_feat = all_gather_cat(image_feat), all_gather_cat(text_feat)
        n = image_feat.shape[0]
        if self.size % n:
            raise ValueError(
                f"queue size {self.size} is not a multiple of the global batch size {n} "
                "(batch per rank x world size); choose a queue size divisible by it, or drop "
                "the last incomplete batch (drop_last=True)"
            )
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + n] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, ptr : ptr + n] = text_feat.T.to(self.text_queue.dtype)
        if self.idx_queue is not None:
            if idx is None:
                raise ValueError("this queue keeps image ids: pass idx to enqueue")
            self.idx_queue[0, ptr : ptr + n] = all_gather_cat(idx.view(-1))
        self.queue_ptr[0] = (ptr + n) % self.size
