"""One gradient for a table used twice: BERT's word embeddings, which are also the MLM decoder.

Through plain autograd the decoder's weight gradient is made as soon as the backward starts (a
dense vocab x H table, 94 MB at BERT-base in float32) and held to the end of the backward, where
the lookup's gradient, a second dense vocab x H table that is zero except at the rows read, is
added to it. With a :class:`TiedGrad` shared by the two uses, the decoder hands its factors over
instead (the logits' gradient [n, V] and the decoder's input [n, H]: 2 MB for albef-base's 18
masked tokens) and the lookup's backward builds the single table: its own rows, plus the product.
At albef-base batch 4 that removes both 94 MB tables from the backward's peak.

The decoder defers only when the lookup's backward step is still to come in the same backward
(the autograd engine says which nodes it will run) and the factors are smaller than the table
(n < V*H/(V+H), about 750 rows for BERT's vocabulary); otherwise it makes its gradient as usual.
The decoder's side is :func:`albef.models.fast.recompute.linear_after` with ``tie=`` (which
imports this module, not the other way round). Gradients equal plain autograd's bit for bit on
the CPU in float32 (tested; a BLAS that splits the inner dimension of ``addmm_`` may round the
last bit otherwise). Compiled autograd does not see
the hand-over; do not combine the two.

Example:
    >>> from albef.models.fast.recompute import tied_linear
    >>> table = torch.nn.Parameter(torch.randn(10, 4))
    >>> tie = TiedGrad()
    >>> h = embedding_lookup(torch.tensor([[1, 2]]), table, None, tie)  # [1, 2, 4]
    >>> logits = tied_linear(h, table, tie)                             # [1, 2, 10], decoder = table
    >>> logits.sum().backward()
    >>> table.grad.shape
    torch.Size([10, 4])
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class TiedGrad:
    """The decoder's weight-gradient factors for one lookup's backward (one per forward)."""

    def __init__(self) -> None:
        self.lookup: Any = None  # the lookup's autograd node (set by embedding_lookup)
        self.pending: list[tuple[int, Tensor, Tensor]] = []  # (backward's id, dy, a)
        self.done: int | None = None  # the id of the last backward whose lookup step has run

    def defer(self, dy: Tensor, a: Tensor) -> bool:
        """Take ``dy.T @ a`` ([V, H]) for the lookup's backward to add; False if it should be made
        now: the lookup's step has run already or will not run in this backward (``inputs=`` or
        ``autograd.grad`` without the table, an input not from the lookup), or the factors are
        not smaller than the table."""
        n, V, H = dy.shape[0], dy.shape[1], a.shape[1]
        task = torch._C._current_graph_task_id()
        self.pending = [e for e in self.pending if e[0] == task]  # left by a backward that raised
        if (
            n * (V + H) >= V * H
            or self.lookup is None
            or self.done == task
            or not torch._C._will_engine_execute_node(self.lookup)
        ):
            return False
        if not self.pending:  # a safety net: checked once the backward has finished
            torch.autograd.Variable._execution_engine.queue_callback(self._check_taken)
        self.pending.append((task, dy, a))
        return True

    def take(self) -> list[tuple[Tensor, Tensor]]:
        """The current backward's deferred factors (called by the lookup's backward)."""
        task = torch._C._current_graph_task_id()
        self.done = task
        mine = [(dy, a) for t, dy, a in self.pending if t == task]
        self.pending = []
        return mine

    def _check_taken(self) -> None:
        if self.pending:
            self.pending = []
            raise RuntimeError(
                "internal error: the tied decoder's weight gradient was deferred to an "
                "embedding lookup that did not run in this backward"
            )

    # A tie belongs to one forward: a copy of its owner (the momentum teacher is a deep copy of the
    # student) or a pickled model gets a fresh one, not this forward's autograd node
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int, tie: TiedGrad) -> Tensor:
        ctx.save_for_backward(ids)
        # weakly: the tie holds this node (no cycle); without a decoder holding the tie it is gone
        ctx.num_weights, ctx.padding_idx, ctx.tie = weight.shape[0], padding_idx, weakref.ref(tie)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        (ids,) = ctx.saved_tensors
        tie = ctx.tie()
        # the same kernel (and so the same sums) as F.embedding's own backward
        grad = torch.ops.aten.embedding_dense_backward(dy, ids, ctx.num_weights, ctx.padding_idx, False)
        for d, a in tie.take() if tie is not None else ():  # the decoder's term: grad + dy.T @ a, as autograd
            if d.dtype == grad.dtype:
                grad.addmm_(d.t(), a)
            else:
                grad.add_((d.t() @ a).to(grad.dtype))
        return None, grad, None, None


def embedding_lookup(ids: Tensor, weight: Tensor, padding_idx: int | None, tie: TiedGrad | None) -> Tensor:
    """``F.embedding(ids, weight, padding_idx)``; with ``tie``, its backward also adds the tied
    decoder's deferred weight gradient."""
    if tie is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(ids, weight, padding_idx)
    out = _Lookup.apply(ids, weight, -1 if padding_idx is None else padding_idx, tie)
    tie.lookup = out.grad_fn  # the latest lookup with this tie is the one the decoder defers to
    return out
