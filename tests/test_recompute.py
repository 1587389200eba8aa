"""linear_after: same values and gradients as the plain ops, and it keeps x, not f(x)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from albef.models.fast.recompute import gelu_linear, linear_after, norm_linear


def _grads(y, inputs):
    g = torch.randn_like(y, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("which", ["gelu", "norm"])
def test_values_and_gradients_match_the_plain_ops(which):
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5).double()
    norm = torch.nn.LayerNorm(12, eps=1e-6).double()
    with torch.no_grad():  # not the identity init, so that the norm's parameters matter
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)
    if which == "gelu":
        ours, plain = gelu_linear(lin, x), lin(F.gelu(x))
        inputs = [x, lin.weight, lin.bias]
    else:
        ours, plain = norm_linear(norm, lin, x), lin(norm(x))
        inputs = [x, lin.weight, lin.bias, norm.weight, norm.bias]
    torch.testing.assert_close(ours, plain)
    for a, b in zip(_grads(ours, inputs), _grads(plain, inputs), strict=True):
        torch.testing.assert_close(a, b)


def test_gradcheck_with_some_inputs_frozen():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, dtype=torch.float64)  # frozen LayerNorm weight
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    f = lambda x, g, b: F.layer_norm(x, (6,), g, b, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, w, b: linear_after(f, x, w, None, g, b), (x, w, b))


def test_keeps_the_input_not_the_function_output():
    lin = torch.nn.Linear(64, 8)
    h = torch.randn(32, 64, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gelu_linear(lin, h)
    assert any(t is h for t in kept)
    assert all(t.shape != h.shape or t is h for t in kept)  # no second [32, 64] tensor: GELU(h) is not kept
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(F.gelu(h))
    assert sum(t.shape == h.shape for t in kept) == 2  # the plain ops keep h and GELU(h)


def test_under_autocast_matches_plain_autocast():
    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(16, 8), torch.nn.LayerNorm(16)
    x = torch.randn(5, 16, requires_grad=True)
    params = [x, lin.weight, lin.bias, norm.weight, norm.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = norm_linear(norm, lin, x), lin(norm(x))
    assert ours.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(ours, plain)
    for a, b, p in zip(_grads(ours, params), _grads(plain, params), params, strict=True):
        assert a.dtype == p.dtype  # parameters' gradients in their own dtype, as autocast gives them
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # bf16 products either way


def test_no_grad_is_the_plain_function():
    lin = torch.nn.Linear(4, 2)
    h = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(gelu_linear(lin, h), lin(F.gelu(h)))


@pytest.mark.parametrize("affine", ["both", "no_bias", "none"])
def test_layer_norm_without_affine_parameters(affine):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(6, elementwise_affine=affine != "none", bias=affine == "both").double()
    lin = torch.nn.Linear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    inputs = [x, lin.weight] + [p for p in norm.parameters()]
    ours, plain = norm_linear(norm, lin, x), lin(norm(x))
    torch.testing.assert_close(ours, plain)
    for a, b in zip(_grads(ours, inputs), _grads(plain, inputs), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("frozen", ["x", "weight", "both"])
def test_gelu_under_autocast_with_frozen_inputs(frozen):
    """bf16 products, and only the gradients asked for (a frozen input gets none)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    lin.weight.requires_grad_(frozen == "x")
    h = torch.randn(5, 16, requires_grad=frozen != "x")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = gelu_linear(lin, h), lin(F.gelu(h))
    torch.testing.assert_close(ours, plain)
    wanted = [t for t in (h, lin.weight, lin.bias) if t.requires_grad]
    for a, b, t in zip(_grads(ours, wanted), _grads(plain, wanted), wanted, strict=True):
        assert a.dtype == t.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_double_backward_is_refused():
    lin = torch.nn.Linear(4, 2).double()
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gelu_linear(lin, h).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_mlm_head_with_a_tied_table_matches_the_plain_head():
    """The decoder is the word-embedding table, also used by the lookup: the two gradients of the
    table are summed (in place, see layer_norm_linear) to what the plain head gives."""
    import copy

    from albef.config import get_preset
    from albef.models.bert import MLMHead
    from albef.models.fast import make_fast

    torch.manual_seed(0)
    cfg = get_preset("albef-tiny").text
    plain_head = MLMHead(cfg).double()
    head = make_fast(copy.deepcopy(plain_head))
    table = torch.randn(cfg.vocab_size, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, cfg.vocab_size, (3, 5))

    def run(plain: bool):
        hidden = F.embedding(ids, table).sum(1)  # [3, H], a use of the table before the decoder
        return plain_head(hidden, table) if plain else head(hidden, table)

    ours, plain = run(False), run(True)
    torch.testing.assert_close(ours, plain)
    ours_grads = _grads(ours, [table, head.bias, *head.transform.parameters()])
    plain_grads = _grads(plain, [table, plain_head.bias, *plain_head.transform.parameters()])
    for a, b in zip(ours_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_backward_recomputes_under_the_forward_autocast():
    """The recomputation in the backward runs under the autocast state of the forward, as
    torch.utils.checkpoint's does: CUDA autocast runs layer_norm in float32, and CUDA's layer_norm
    without autocast refuses a bf16 input with float32 weights (bf16 training stopped there)."""
    seen = []

    def f(x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return F.gelu(x)

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_after(f, x, lin.weight, lin.bias)
    y.float().sum().backward()  # outside autocast, as the training loop's backward
    assert seen == [(True, torch.bfloat16)] * 2
    seen.clear()
    linear_after(f, x, lin.weight, lin.bias).sum().backward()
    assert seen == [(False, torch.get_autocast_dtype("cpu"))] * 2


class _Casts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the float32 -> bfloat16 casts (``aten._to_copy``) run inside it, by shape."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and (args[0].dtype, kwargs.get("dtype")) == (
            torch.float32,
            torch.bfloat16,
        ):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def test_under_autocast_the_backward_reuses_the_forward_cast():
    """The weight is cast to bf16 once in the forward and that copy serves the backward's input
    gradient (autocast alone casts it again in the backward of every use)."""
    torch.manual_seed(0)
    lin, norm = torch.nn.Linear(16, 24), torch.nn.LayerNorm(16)
    x = torch.randn(5, 16, requires_grad=True)
    casts = _Casts()
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        y = norm_linear(norm, lin, x)
    assert casts.shapes.count((24, 16)) == 1
    casts.shapes.clear()
    with casts:
        y.float().sum().backward()
    assert (24, 16) not in casts.shapes
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_mlm_head_under_autocast_keeps_the_table_in_float32():
    """The fast MLM head's LayerNorm and decoder run in float32 under autocast: the word table is
    never cast (forward or backward), the logits are float32 and nearer the float64 head's than
    the plain head's bf16 logits are."""
    import copy

    from albef.config import get_preset
    from albef.models.bert import MLMHead
    from albef.models.fast import make_fast

    torch.manual_seed(0)
    cfg = get_preset("albef-tiny").text
    plain_head = MLMHead(cfg)
    head = make_fast(copy.deepcopy(plain_head))
    table = torch.randn(cfg.vocab_size, cfg.hidden_size, requires_grad=True)
    hidden = torch.randn(7, cfg.hidden_size)
    exact = copy.deepcopy(plain_head).double()(hidden.double(), table.detach().double())
    casts = _Casts()
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        ours = head(hidden, table)
        plain = plain_head(hidden, table)
    assert ours.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert casts.shapes.count(tuple(table.shape)) == 1  # the plain head's, none of ours
    casts.shapes.clear()
    with casts:
        (grad,) = torch.autograd.grad(ours.sum(), table)
    assert tuple(table.shape) not in casts.shapes and grad.dtype == torch.float32
    assert (ours.double() - exact).abs().max() < (plain.double() - exact).abs().max()
