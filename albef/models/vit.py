"""The ViT image encoder, with timm's parameter names so DeiT/timm and ALBEF weights load as-is.

The plain model; :func:`albef.models.fast.make_fast` recomputes its LayerNorm and GELU outputs in
the backward instead of keeping them (:mod:`albef.models.fast.vit`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from albef.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> [B, N, D]
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # Grad-CAM (ITC mode) reads the attention map of a chosen block; SDPA never materialises it
        self.save_attention = False
        self.attention_map: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:  # [B, N, C] -> [B, N, C]
        return self.proj(self.attend(self.qkv(x)))

    def attend(self, qkv: Tensor) -> Tensor:
        """The heads' attention over projected queries, keys and values: [B, N, 3C] -> [B, N, C]."""
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d]
        return self.attend_heads(q, k, v).transpose(1, 2).reshape(B, N, C)

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, h, N, d] x 3 -> [B, h, N, d]
        if self.save_attention:
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # [B, h, N, N]
            if attn.requires_grad:
                attn.retain_grad()
            elif torch.is_grad_enabled():  # frozen weights: still let Grad-CAM differentiate the map
                attn.requires_grad_(True)
            self.attention_map = attn
            return attn @ v
        return F.scaled_dot_product_attention(q, k, v)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT returning the final-norm sequence ``[CLS] + patches``: [B, 1 + N, D].

    Example:
        >>> vit = VisionTransformer(VisionConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2))
        >>> vit(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False  # recompute each block in the backward (memory for time)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's initialisation: truncated normal 0.02 for tokens and linears.
        if self.cfg.pos_embed_init == "sincos":
            with torch.no_grad():
                self.pos_embed.zero_()  # [CLS] has no place
                self.pos_embed[0, 1:] = sincos_pos_embed(self.cfg.grid_size, self.cfg.width)
        elif self.cfg.pos_embed_init == "trunc_normal":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            raise ValueError(f"vision.pos_embed_init: {self.cfg.pos_embed_init!r} is not 'trunc_normal' or 'sincos'")
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 1 + N, D]
        x = self.embed(images)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and x.requires_grad else blk(x)
        return self.norm(x)

    def embed(self, images: Tensor) -> Tensor:
        """Patches with [CLS] first, plus positions: [B, 3, H, W] -> [B, 1 + N, D]."""
        x = self.patch_embed(images)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]


def sincos_pos_embed(grid: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine positions, row-major like the patches: [grid * grid, dim].

    Half the channels encode the column, half the row, each as sines and cosines of
    ``pos / 10000 ** (i / (dim / 4))`` (MAE's ``get_2d_sincos_pos_embed``).

        >>> sincos_pos_embed(4, 8).shape
        torch.Size([16, 8])
    """
    if dim % 4:
        raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:  # [G*G] -> [G*G, D/2]
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


def resize_pos_embed(pos_embed: Tensor, num_patches: int, num_extra_tokens: int = 1) -> Tensor:
    """Bicubically resize a ViT position table to a new square patch grid.

    The extra tokens (``[CLS]``) are kept as they are; the grid part is interpolated like the
    authors' ``interpolate_pos_embed`` (bicubic, ``align_corners=False``).

    Example:
        >>> resize_pos_embed(torch.zeros(1, 17, 8), num_patches=36).shape
        torch.Size([1, 37, 8])
    """
    old = pos_embed.shape[-2] - num_extra_tokens
    old_size, new_size = round(old**0.5), round(num_patches**0.5)
    if old_size**2 != old or new_size**2 != num_patches:
        raise ValueError(f"pos_embed grid is not square: {old} -> {num_patches} patches")
    if old_size == new_size:
        return pos_embed
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(-1, old_size, old_size, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([extra, grid], dim=1)
