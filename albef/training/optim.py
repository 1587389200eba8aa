"""AdamW applied inside the backward pass (``train.optimizer_in_backward``).

An ordinary step keeps every gradient alive until ``optimizer.step()``: 0.84 GB at albef-base,
the peak of a CPU step. Here parameters are updated as soon as their gradients are complete, a
few tensors (``bucket_mb``) at a time, and the gradients freed, so they never all exist. The
update is AdamW's own (the fused kernel treats every tensor independently, so updating some
tensors at a time gives the same numbers as one call over all of them).

Example:
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = AdamWInBackward([{"params": list(model.parameters()), "weight_decay": 0.0}], lr=0.1)
    >>> model(torch.ones(1, 4)).sum().backward()   # the update happens here
    >>> model.weight.grad is None
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class AdamWInBackward(torch.optim.AdamW):
    """:class:`torch.optim.AdamW` whose work happens in ``backward()``.

    ``step()`` is AdamW's: after a backward no parameter holds a gradient any more, so it has
    nothing left to do (gradients set by other means, such as the zero-gradient step with which
    ``torch.distributed.checkpoint`` initialises the state before loading, are still applied).

    It needs the complete gradient of a parameter when its hook fires, so it cannot be combined
    with gradient accumulation, clipping, loss scaling or gradients reduced across processes after
    the backward (DDP, FSDP): :func:`check_in_backward` says so. A backward that raises midway
    leaves the parameters updated before the error updated (an ordinary step would have updated
    none) and the rest with their gradients on ``.grad``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, bucket_mb: float = 32.0, **kwargs: Any):
        """``bucket_mb``: parameters whose gradients are complete are updated together once their
        gradients reach this size (and at the end of the backward): one fused AdamW call per
        bucket instead of one per tensor (the per-call cost was ~3 % of an albef-base CPU step),
        at most this much gradient memory held beyond the tensor being finished."""
        self._handles: list = []
        self._ready: list[Tensor] = []
        self._ready_bytes = 0
        self._task: int | None = None  # the backward whose gradients _ready holds
        self.bucket_bytes = int(bucket_mb * 2**20)
        super().__init__(params, lr=lr, **kwargs)  # calls add_param_group for each group

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._index_groups()
        self._handles += [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for p in self.param_groups[-1]["params"]
            if p.requires_grad
        ]

    def _index_groups(self) -> None:
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def _on_grad(self, p: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # this backward's first: what is left is updated when it ends
            # (a list left by a backward that raised is dropped; its gradients stay on .grad for
            # step() or zero_grad(), as an ordinary optimizer's would)
            self._ready, self._ready_bytes, self._task = [], 0, task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self._ready.append(p)
        self._ready_bytes += p.grad.numel() * p.grad.element_size()
        if self._ready_bytes >= self.bucket_bytes:
            self._update_ready()

    def _end_of_backward(self) -> None:
        self._update_ready()
        self._task = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._ready, self._ready_bytes, self._task = [], 0, None
        super().zero_grad(set_to_none)

    @torch.no_grad()
    def _update_ready(self) -> None:
        """AdamW.step over the parameters whose gradients are complete, each with its group's
        hyper-parameters; their gradients are then freed."""
        ready, self._ready, self._ready_bytes = self._ready, [], 0
        if not ready:
            return
        mine: dict[int, list[Tensor]] = {id(g): [] for g in self.param_groups}
        for p in ready:
            mine[id(self._group_of[p])].append(p)
        saved = [g["params"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["params"] = mine[id(g)]
            super().step()
        finally:
            for g, params in zip(self.param_groups, saved, strict=True):
                g["params"] = params
        for p in ready:
            p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._index_groups()  # loading replaces the group dicts

    def remove_hooks(self) -> None:
        """Detach from the parameters (before building another optimizer over the same model)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def resolve_in_backward(
    setting: bool | str, grad_accum: int, max_grad_norm: float | None, precision: str, world_size: int, fsdp: bool
) -> bool:
    """``train.optimizer_in_backward``: ``"auto"`` (the default) turns it on wherever it gives the
    ordinary update (one process, no accumulation, clipping or fp16 loss scaling); ``True`` is
    refused elsewhere, with the reason; ``False`` is the ordinary step after the backward.

    >>> resolve_in_backward("auto", 1, None, "fp32", 1, False), resolve_in_backward("auto", 2, None, "fp32", 1, False)
    (True, False)
    """
    if setting is None:  # YAML's null
        setting = False
    if setting == "auto":
        return not in_backward_problems(grad_accum, max_grad_norm, precision, world_size, fsdp)
    if not isinstance(setting, bool):
        raise ValueError(f"train.optimizer_in_backward must be true, false or auto, not {setting!r}")
    if setting:
        check_in_backward(grad_accum, max_grad_norm, precision, world_size, fsdp)
    return setting


def one_process_in_backward(flag: str, precision: str) -> bool:
    """A command-line ``auto``/``true``/``false`` for one process without accumulation or clipping
    (``albef bench``, the benchmark harness), resolved as :func:`resolve_in_backward` does.

    >>> one_process_in_backward("auto", "fp32"), one_process_in_backward("auto", "fp16")
    (True, False)
    """
    setting = {"true": True, "false": False}.get(flag, flag)
    return resolve_in_backward(setting, 1, None, precision, 1, False)


def in_backward_problems(
    grad_accum: int, max_grad_norm: float | None, precision: str, world_size: int, fsdp: bool
) -> list[str]:
    """The settings under which a gradient is not final when its hook fires."""
    problems = []
    if grad_accum > 1:
        problems.append(f"train.grad_accum={grad_accum} (the update would use a partial gradient)")
    if max_grad_norm:
        problems.append("train.max_grad_norm (clipping needs every gradient before any update)")
    if precision == "fp16":
        problems.append("train.precision=fp16 (the loss scaler unscales all gradients together; use bf16)")
    if world_size > 1 or fsdp:
        problems.append("more than one process (DDP/FSDP reduce the gradients after the hook fires)")
    return problems


def check_in_backward(
    grad_accum: int, max_grad_norm: float | None, precision: str, world_size: int, fsdp: bool
) -> None:
    """Refuse the combinations in which a gradient is not final when its hook fires."""
    problems = in_backward_problems(grad_accum, max_grad_norm, precision, world_size, fsdp)
    if problems:
        raise ValueError(
            "train.optimizer_in_backward cannot be used with "
            + "; ".join(problems)
            + ". Turn it off, or change those settings."
        )
