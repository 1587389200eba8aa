"""A linear layer after a cheap function, keeping the function's input instead of its output.

``F.linear(f(x), W, b)`` through autograd keeps ``f(x)`` for the weight gradient, and ``f``
(GELU, LayerNorm) keeps ``x`` for its own: two activations where one would do. Here only ``x``
is kept and ``f(x)`` is recomputed in the backward — a GELU or LayerNorm, cheap next to the
matrix products around it. In a ViT-B block that drops the GELU output and both LayerNorm
outputs: 14 of its 38 MB of activations at batch 4, res 224 in float32 (38 %).

Under autocast the product runs in the autocast dtype, as ``F.linear`` would; the backward
recomputes ``f(x)`` in ``x``'s precision and rounds it to the product's dtype.

Example:
    >>> lin = torch.nn.Linear(8, 4)
    >>> h = torch.randn(3, 8, requires_grad=True)
    >>> y = linear_after(F.gelu, h, lin.weight, lin.bias)
    >>> torch.allclose(y, lin(F.gelu(h)))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from albef.models.fast.tied import TiedGrad

#: under autocast, keep the forward's low-precision weight for the backward instead of casting it
#: again there (off: bench/bf16_parts.py measures what it saves)
REUSE_FORWARD_CAST = True


class _LinearAfter(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, f: Callable, x: Tensor, weight: Tensor, bias: Tensor | None, tie: TiedGrad | None, *f_params: Tensor
    ) -> Tensor:
        with torch.no_grad():
            a = f(x, *f_params)
        ctx.f, ctx.tie = f, tie
        # the backward recomputes f under the forward's autocast state, as torch.utils.checkpoint
        # does: CUDA autocast runs layer_norm in float32, and without autocast CUDA's layer_norm
        # refuses a bf16 input with float32 weights
        dev = x.device.type
        ctx.amp = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.has_bias = bias is not None
        ctx.weight_dtype = weight.dtype
        if REUSE_FORWARD_CAST and ctx.amp[2] and weight.dtype in (torch.float32, torch.float64):
            # the weight in the product's dtype, kept for the backward's input gradient: autocast
            # would cast it here (once per forward, cached) and the backward again, for every use
            weight = weight.to(ctx.amp[1])
        ctx.save_for_backward(x, weight, *(() if bias is None else (bias,)), *f_params)
        return F.linear(a, weight, bias)  # autocast (if on) casts a and the bias as for nn.Linear

    @staticmethod
    @once_differentiable  # the recomputation is detached: a double backward would miss terms
    def backward(ctx, dy: Tensor):
        x, weight, *rest = ctx.saved_tensors
        bias = rest.pop(0) if ctx.has_bias else None
        f_params = rest
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        need_p = ctx.needs_input_grad[5:]
        dev, amp_dtype, amp_on = ctx.amp
        with torch.enable_grad(), torch.autocast(dev, dtype=amp_dtype, enabled=amp_on):
            xd = x.detach().requires_grad_(need_x)
            ps = [p.detach().requires_grad_(n) for p, n in zip(f_params, need_p, strict=True)]
            a = ctx.f(xd, *ps)
        dt = dy.dtype  # the product's dtype (the autocast dtype, or the weights')
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_w = None
        if need_w:
            a2 = a.detach().reshape(-1, a.shape[-1]).to(dt)
            if ctx.tie is None or not ctx.tie.defer(dy2, a2):  # deferred: the tied lookup adds dy2.T @ a2
                grad_w = (dy2.t() @ a2).to(ctx.weight_dtype)
        grad_b = dy2.sum(0).to(bias.dtype) if need_b else None
        wanted = [t for t, n in zip([xd, *ps], [need_x, *need_p], strict=True) if n]
        grads = iter(())
        if wanted:
            da = (dy @ weight.to(dt)).to(a.dtype)
            grads = iter(torch.autograd.grad(a, wanted, da))
        grad_x = next(grads) if need_x else None
        grad_ps = [next(grads) if n else None for n in need_p]
        return (None, grad_x, grad_w, grad_b, None, *grad_ps)


def linear_after(
    f: Callable[..., Tensor],
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *f_params: Tensor,
    tie: TiedGrad | None = None,
) -> Tensor:
    """``F.linear(f(x, *f_params), weight, bias)``, saving ``x`` instead of ``f(x)`` for the
    backward. ``f`` must be deterministic (it runs again in the backward) and cheap. With ``tie``
    (``weight`` is also an embedding table looked up with it) the weight's gradient may be left to
    the lookup's backward (:mod:`albef.models.fast.tied`)."""
    if not torch.is_grad_enabled():
        return F.linear(f(x, *f_params), weight, bias)
    return _LinearAfter.apply(f, x, weight, bias, tie, *f_params)


def norm_linear(norm: torch.nn.LayerNorm, linear: torch.nn.Linear, x: Tensor) -> Tensor:
    """``linear(norm(x))`` keeping ``x`` alone (the LayerNorm output is recomputed)."""
    return layer_norm_linear(norm, x, linear.weight, linear.bias)


def layer_norm_linear(
    norm: torch.nn.LayerNorm, x: Tensor, weight: Tensor, bias: Tensor | None, tie: TiedGrad | None = None
) -> Tensor:
    """``F.linear(norm(x), weight, bias)`` keeping ``x`` alone, for a weight that is not a Linear's
    (BERT's MLM decoder is the word-embedding table). The weight's gradient comes out as a fresh
    contiguous tensor, not the transposed view that ``F.linear``'s backward gives, so a second
    use of the same weight (the embedding lookup) is added to it in place; with ``tie`` the
    lookup's backward makes the one gradient itself (:mod:`albef.models.fast.tied`)."""
    # (weight, bias), (weight,) with bias=False, or () without elementwise_affine
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    shape, eps = norm.normalized_shape, norm.eps

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return F.layer_norm(x, shape, ps[0] if ps else None, ps[1] if len(ps) == 2 else None, eps)

    return linear_after(f, x, weight, bias, *params, tie=tie)


def gelu_linear(linear: torch.nn.Linear, h: Tensor) -> Tensor:
    """``linear(gelu(h))`` keeping the pre-activation ``h`` alone."""
    return linear_after(F.gelu, h, linear.weight, linear.bias)


def tied_linear(x: Tensor, weight: Tensor, tie: TiedGrad, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient may go to the tied lookup's backward
    (for decoders without a LayerNorm before them, and tests)."""
    return linear_after(_identity, x, weight, bias, tie=tie)


def _identity(x: Tensor) -> Tensor:
    return x
