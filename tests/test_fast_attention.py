"""The ViT's written-out attention (albef.models.fast.attention): the same function as SDPA, sliced
over the batch, taken only in bfloat16 on the CPU, and within bfloat16's error there."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import albef.models.fast.attention as fa
from albef.config import VisionConfig
from albef.models.fast import make_fast
from albef.models.vit import VisionTransformer


def _qkv(B: int, h: int, N: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("slice_scores", [fa.SCORES_PER_SLICE, 2 * 3 * 17 * 17, 1])  # one slice, 2 items, 1 item
def test_equals_sdpa_in_float64_values_and_gradients(monkeypatch, slice_scores):
    monkeypatch.setattr(fa, "SCORES_PER_SLICE", slice_scores)
    q, k, v = _qkv(5, 3, 17, 8, torch.float64)
    ours = fa.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_keys_of_another_length():
    q = _qkv(2, 2, 5, 8, torch.float64)[0]
    k, v = _qkv(2, 2, 11, 8, torch.float64, seed=1)[1:]
    torch.testing.assert_close(fa.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_taken_only_for_bfloat16_on_the_cpu():
    assert fa.written_out_is_faster(torch.zeros(1, dtype=torch.bfloat16))
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert not fa.written_out_is_faster(torch.zeros(1, dtype=dtype))
    assert not fa.written_out_is_faster(torch.zeros(1, dtype=torch.bfloat16, device="meta"))


def test_bfloat16_error_is_that_of_bfloat16_products():
    """Against float64: the error of rounding the scores to bf16 (eager autocast's numbers) is a
    small multiple of SDPA's, which keeps them in float32; both are bf16-sized (2**-8 relative)."""
    exact = [t.detach().requires_grad_() for t in _qkv(4, 3, 65, 64, torch.float64)]
    low = [t.detach().bfloat16().requires_grad_() for t in exact]
    g = torch.randn(4, 3, 65, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = F.scaled_dot_product_attention(*exact)
    ref_grads = torch.autograd.grad(ref, exact, g)

    def errors(out: torch.Tensor) -> list[float]:
        grads = torch.autograd.grad(out, low, g.bfloat16())
        rel = [float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(grads, ref_grads, strict=True)]
        err = (out.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max()
        return [float(err), *rel]

    ours, sdpa = errors(fa.attention(*low)), errors(F.scaled_dot_product_attention(*low))
    for e, s in zip(ours, sdpa, strict=True):
        assert e < 0.05 and e < 4 * s, (ours, sdpa)


def test_fast_vit_under_bf16_autocast_matches_the_plain_vit(monkeypatch):
    import albef.models.fast.vit as fv

    cfg = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=2)
    plain = VisionTransformer(cfg)
    fast = make_fast(copy.deepcopy(plain))
    images = torch.randn(3, 3, 32, 32)
    seen = []
    monkeypatch.setattr(fv, "attention", lambda *a: seen.append(1) or fa.attention(*a))

    def run(model: VisionTransformer) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        out.float().square().mean().backward()
        return out.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (out, grads), (ref, ref_grads) = run(fast), run(plain)
    assert len(seen) == cfg.depth  # the written-out path, once per block
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert F.cosine_similarity(grads, ref_grads, dim=0) > 0.999


@pytest.mark.parametrize("mask_rows", [1, 6])  # [B, 1, 1, N] padding, or [B, 1, L, N]
def test_masked_equals_the_plain_probabilities(monkeypatch, mask_rows):
    """With a boolean mask (True = attend), sliced over the batch: the plain text attention's
    probabilities @ v in float64, a fully masked row uniform as there."""
    from albef.models.bert import MultiHeadAttention

    monkeypatch.setattr(fa, "SCORES_PER_SLICE", 2 * 3 * 6 * 9)
    q = _qkv(5, 3, 6, 8, torch.float64)[0]
    k, v = _qkv(5, 3, 9, 8, torch.float64, seed=1)[1:]
    mask = torch.rand(5, 1, mask_rows, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[0] = False  # no key at all
    plain = MultiHeadAttention(24, 3, 24, 0.0).double()
    torch.testing.assert_close(fa.attention(q, k, v, mask), plain.probabilities(q, k, mask) @ v)
    shared = mask[:1]  # one mask for the whole batch
    torch.testing.assert_close(fa.attention(q, k, v, shared), plain.probabilities(q, k, shared) @ v)
