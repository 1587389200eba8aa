"""The optimizer of a run: AdamW with the reference's parameter groups (:func:`build_optimizer`),
and AdamW applied inside the backward pass (``train.optimizer_in_backward``).

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

import math
from typing import Any

import torch
from torch import Tensor, nn

from albef.training.fsdp import is_sharded


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


# -- the optimizer of a run ------------------------------------------------------------------


def _under(name: str, prefix: str) -> bool:  # "a.b" is under "a" and "a.b", not under "a.bc"
    return name == prefix.rstrip(".") or name.startswith(prefix.rstrip(".") + ".")


def lr_scale_of(name: str, lr_scale: dict[str, float] | None) -> float:
    """The multiplier of the parameter ``name``: the value of the longest matching prefix, else 1."""
    hits = [k for k in (lr_scale or {}) if _under(name, k)]
    return lr_scale[max(hits, key=len)] if hits else 1.0


def _multiplier(prefix: str, v: Any) -> float:
    if isinstance(v, dict):  # train.lr_scale.text_encoder.embeddings=0.1 nests at each dot
        raise ValueError(
            f"train.lr_scale[{prefix!r}] is a mapping: give the prefix whole, "
            "e.g. train.lr_scale='{text_encoder.embeddings: 0.1}'"
        )
    try:
        x = float(v)  # YAML may hand "1e-1" over as a string
    except (TypeError, ValueError):
        x = math.nan
    if not 0 <= x < math.inf:
        raise ValueError(f"train.lr_scale[{prefix!r}] = {v!r}: give a finite multiplier >= 0")
    return x


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    in_backward: bool = False,
    lr_scale: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW with the reference's groups: no decay for 1-D tensors and biases, decay for the rest.

    ``in_backward``: :class:`albef.training.optim.AdamWInBackward` (the same update, applied during
    the backward as gradients complete, a few tensors at a time, and those gradients freed).

    ``lr_scale`` (``train.lr_scale``): parameter-name prefix -> multiplier of the scheduled learning
    rate (the longest prefix wins), kept in each group as ``lr_scale``; e.g.
    ``{"text_encoder.encoder.layer.0": 0.1}``. Empty (the reference): one rate for every parameter.

    As in the reference (timm's factory called on the top-level model, which names no exceptions),
    ``pos_embed``, ``cls_token`` and the 0-dim ``temp`` are decayed.

    >>> opt = build_optimizer(model, lr=1e-4, weight_decay=0.02, lr_scale={"text_encoder": 0.1})  # doctest: +SKIP
    """
    checked = {prefix: _multiplier(prefix, v) for prefix, v in (lr_scale or {}).items()}
    for prefix in checked:
        if not any(_under(n, prefix) for n, _ in model.named_parameters()):
            raise ValueError(
                f"train.lr_scale: no parameter name starts with {prefix!r} "
                f"(names look like {next(n for n, _ in model.named_parameters())!r})"
            )
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (not (p.ndim == 1 or name.endswith(".bias")), lr_scale_of(name, checked))
            groups.setdefault(key, []).append(p)
    # The fused kernel (one pass over each tensor instead of a chain of foreach ops) computes the
    # same update; on 2 CPU cores it takes the AdamW step of albef-base from 0.53 s to 0.13 s.
    params = [p for ps in groups.values() for p in ps]
    sharded = any(is_sharded(p) for p in params)  # FSDP: sharded and replicated tensors can't share a kernel
    fused = (
        not sharded and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    )
    cls = AdamWInBackward if in_backward else torch.optim.AdamW
    # the reference's two groups (no decay first) when nothing is scaled; state dicts match it then
    order = sorted(groups, key=lambda k: (k[1] != 1.0, k[1], k[0]))
    param_groups = [
        {"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1]} for k in order
    ]
    if not groups:
        param_groups = [{"params": [], "weight_decay": 0.0, "lr_scale": 1.0}]
    return cls(param_groups, lr=lr, fused=fused or None, foreach=False if sharded else None)
