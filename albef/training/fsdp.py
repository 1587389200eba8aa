"""Sharded training with PyTorch's FSDP2 (``fully_shard``), for models beyond ViT-B/BERT-base.

Every transformer block of the student — ViT blocks, BERT layers, the VQA decoder's layers — is
sharded across the ranks, and its momentum teacher's blocks the same way, so the EMA update is a
local operation on matching shards (done by the loop between steps, when every block is sharded).
What stays outside the blocks (patch and word embeddings, projections, heads, the temperature) is
small and stays replicated like under DDP; its gradients are averaged by
:func:`sync_replicated_grads`. The ITC queues are buffers, replicated on every rank and filled with
the all-gathered momentum features, exactly as with DDP.

Checkpoints hold full (unsharded) state dicts, gathered with ``torch.distributed.checkpoint``'s
state-dict API, so a run saved on N ranks resumes on any number of ranks, with or without FSDP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from albef.models.vit import VisionTransformer
from albef.training.trainer import Trainer


def _blocks(encoder: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a ViT (``blocks``) or a BERT stack (``encoder.layer``)."""
    return list(encoder.blocks) if isinstance(encoder, VisionTransformer) else list(encoder.encoder.layer)


def shard_trainer(trainer: Trainer, device_type: str) -> None:
    """Shard the blocks of ``trainer.model`` and of its teacher ``trainer.model_m`` (if any).

    Each block is its own FSDP unit, re-sharded after its forward (the teacher's blocks never run
    backward, and FSDP would keep a root unit gathered until then). The cross-attention key/value
    projections stay replicated: the model projects image keys/values once per image, outside the
    layers' forward, and reuses them across fusion passes.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    blocks = [block for encoder in trainer.encoders() for block in _blocks(encoder)]
    if not blocks:
        raise ValueError(f"{type(trainer.model).__name__} has no transformer blocks to shard")
    for block in blocks:
        kv = {
            p
            for n, p in block.named_parameters()
            if n.startswith(("crossattention.self.key.", "crossattention.self.value."))
        }
        fully_shard(block, mesh=mesh, ignored_params=kv or None)
        block.register_forward_hook(lambda module, args, out: module.reshard())


def is_sharded(p: Tensor) -> bool:
    return isinstance(p, DTensor)


def local(p: Tensor) -> Tensor:
    """A parameter's local data: the shard of a sharded one, the tensor itself otherwise."""
    return p.to_local() if is_sharded(p) else p


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad and not is_sharded(p)]


@torch.no_grad()
def sync_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of the replicated (unsharded) parameters over the ranks, as DDP would."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) over a model whose blocks are FSDP shards and
    whose other parameters are replicated: the shards' squared norms are summed over the ranks,
    the replicated gradients (equal on every rank after :func:`sync_replicated_grads`) counted
    once. Returns the total norm before clipping.

    >>> total = clip_grad_norm(trainer.model.parameters(), 1.0)  # doctest: +SKIP
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    shards = [local(g) for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]

    def sq(ts: list[Tensor]) -> Tensor:
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in ts]).square().sum()

    dev = local(grads[0]).device
    sharded_sq = sq(shards).to(dev) if shards else torch.zeros((), device=dev)
    if shards and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sharded_sq)
    total = (sharded_sq + (sq(plain).to(dev) if plain else 0.0)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ formula
    for g in shards + plain:
        g.mul_(coef.to(g.device, g.dtype))
    return total
