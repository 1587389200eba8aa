"""The ViT's fast forward: its LayerNorm and GELU outputs are recomputed in the backward instead of
kept (:mod:`albef.models.fast.recompute`): 14 of a ViT-B block's 38 MB of activations at batch 4,
res 224 in float32. Subclasses of :mod:`albef.models.vit`'s modules, swapped in by
:func:`albef.models.fast.make_fast`."""

from __future__ import annotations

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from albef.models.fast.recompute import gelu_linear, norm_linear
from albef.models.vit import Block, VisionTransformer


class FastBlock(Block):
    def forward(self, x: Tensor, recompute: bool = True) -> Tensor:
        """``recompute`` off inside a checkpointed block, which keeps nothing anyway and would
        recompute them twice."""
        if not recompute:
            return super().forward(x)
        attn, mlp = self.attn, self.mlp
        x = x + attn.proj(attn.attend(norm_linear(self.norm1, attn.qkv, x)))  # x + attn(norm1(x))
        return x + gelu_linear(mlp.fc2, norm_linear(self.norm2, mlp.fc1, x))  # x + mlp(norm2(x))


class FastVisionTransformer(VisionTransformer):
    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 1 + N, D]
        x = self.embed(images)
        for blk in self.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(blk, x, False, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)
