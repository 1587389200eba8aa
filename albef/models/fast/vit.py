"""The ViT's fast forward: its LayerNorm and GELU outputs are recomputed in the backward instead of
kept (:mod:`albef.models.fast.recompute`): 14 of a ViT-B block's 38 MB of activations at batch 4,
res 224 in float32; in bfloat16 on the CPU, attention is written out (:mod:`.attention`).
Subclasses of :mod:`albef.models.vit`'s modules, swapped in by :func:`albef.models.fast.make_fast`."""

from __future__ import annotations

from torch import Tensor
from torch.utils.checkpoint import checkpoint

from albef.models.fast.attention import attention, written_out_is_faster
from albef.models.fast.recompute import gelu_linear, norm_linear
from albef.models.vit import Attention, Block, VisionTransformer


class FastAttention(Attention):
    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, h, N, d] x 3 -> [B, h, N, d]
        if self.save_attention or not written_out_is_faster(q):
            return super().attend_heads(q, k, v)
        return attention(q, k, v)


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
