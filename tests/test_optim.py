"""AdamW inside the backward: the same update as AdamW, gradients freed as it goes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from albef.training.optim import AdamWInBackward, build_optimizer, check_in_backward, lr_scale_of, resolve_in_backward


class Tied(nn.Module):
    """Embedding tied to the output projection (like BERT's MLM decoder), a LayerNorm, a bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.hidden = nn.Linear(6, 6)
        self.out_bias = nn.Parameter(torch.zeros(11))

    def forward(self, ids):
        h = self.hidden(self.norm(self.emb(ids))).relu()
        return h @ self.emb.weight.T + self.out_bias


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(11, (3, 5), generator=g), torch.randint(11, (3, 5), generator=g)) for _ in range(n)]


def _train(model, opt, batches, lrs):
    for (x, y), lr in zip(batches, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # as the training loop sets it
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if isinstance(opt, AdamWInBackward):
            assert all(p.grad is None for p in model.parameters())  # freed in the backward
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_in_backward_equals_adamw_bit_for_bit():
    torch.manual_seed(0)
    a = Tied()
    b = Tied()
    b.load_state_dict(a.state_dict())
    init = {k: v.clone() for k, v in a.state_dict().items()}
    batches, lrs = _batches(4), [1e-2, 5e-3, 5e-3, 1e-3]  # a changing schedule reaches both
    _train(a, build_optimizer(a, 1e-2, 0.1), batches, lrs)
    _train(b, build_optimizer(b, 1e-2, 0.1, in_backward=True), batches, lrs)
    moved = 0
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        moved += int(not torch.equal(pa, init[name]))
    assert moved == 6  # every tensor was updated (weight decay on the matrices, Adam on all)


@pytest.mark.parametrize("bucket_mb", [0.0, 1e-4, 64.0])  # each tensor alone, a few together, all at the end
def test_updates_grouped_in_buckets_equal_adamw_and_finish_with_the_backward(bucket_mb):
    torch.manual_seed(0)
    a, b = Tied(), Tied()
    b.load_state_dict(a.state_dict())
    batches, lrs = _batches(3), [1e-2, 5e-3, 1e-3]
    _train(a, build_optimizer(a, 1e-2, 0.1), batches, lrs)
    opt = build_optimizer(b, 1e-2, 0.1, in_backward=True)
    opt.bucket_bytes = int(bucket_mb * 2**20)
    calls = []
    real = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):  # how many gradients each AdamW step finds
        calls.append(sum(p.grad is not None for g in self.param_groups for p in g["params"]))
        return real(self, *args, **kwargs)

    torch.optim.AdamW.step = counting_step
    try:
        _train(b, opt, batches, lrs)  # asserts every gradient is freed when backward() returns
    finally:
        torch.optim.AdamW.step = real
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    in_backward = [n for n in calls if n]  # the explicit step() after each backward finds no gradient
    assert sum(in_backward) == 3 * 6  # every tensor once per step
    calls_per_step = {0.0: 6, 64.0: 1}  # one call per tensor / one at the end of the backward
    if bucket_mb in calls_per_step:
        assert len(in_backward) == 3 * calls_per_step[bucket_mb]
    else:
        assert 3 < len(in_backward) < 18


def test_a_backward_that_raised_does_not_leak_into_the_next():
    """Parameters whose hooks fired before the error were updated; the next backward updates
    every parameter exactly once (a stale list would have stepped some twice)."""
    torch.manual_seed(0)
    model = Tied()
    opt = build_optimizer(model, 1e-2, 0.1, in_backward=True)
    opt.bucket_bytes = 2**30  # everything waits for the end of the backward, which the error skips
    ((x, y),) = _batches(1)

    def loss(fail: bool):
        h = model.hidden(model.norm(model.emb(x)))
        if fail:
            h.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
        logits = h.relu() @ model.emb.weight.T + model.out_bias
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    loss(False).backward()

    def steps() -> dict[str, int]:
        return {n: int(opt.state[p]["step"]) for n, p in model.named_parameters() if p in opt.state}

    assert set(steps().values()) == {1}
    with pytest.raises(RuntimeError, match="boom"):
        loss(True).backward()
    opt.zero_grad()
    before = steps()
    loss(False).backward()
    after = steps()
    assert all(after[n] == before.get(n, 0) + 1 for n in after), (before, after)
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip_and_interchangeable_with_adamw():
    torch.manual_seed(1)
    batches, lrs = _batches(4), [1e-2] * 4
    straight = Tied()
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    _train(straight, build_optimizer(straight, 1e-2, 0.1, in_backward=True), batches, lrs)

    first = Tied()
    first.load_state_dict(init)
    opt = build_optimizer(first, 1e-2, 0.1)  # plain AdamW for two steps ...
    _train(first, opt, batches[:2], lrs[:2])
    resumed = Tied()
    resumed.load_state_dict(first.state_dict())
    opt2 = build_optimizer(resumed, 1e-2, 0.1, in_backward=True)  # ... then in the backward
    opt2.load_state_dict(opt.state_dict())
    _train(resumed, opt2, batches[2:], lrs[2:])
    for (name, pa), pb in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_param_groups_added_later_are_updated_in_the_backward():
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    opt = AdamWInBackward([{"params": [a.weight]}], lr=0.1)
    opt.add_param_group({"params": [a.bias], "weight_decay": 0.0})
    before = a.bias.detach().clone()
    a(torch.ones(1, 3)).sum().backward()
    assert a.bias.grad is None and not torch.equal(a.bias, before)
    opt.remove_hooks()  # detached: gradients stay for another optimizer
    b(torch.ones(1, 3)).sum().backward()
    a(torch.ones(1, 3)).sum().backward()
    assert a.weight.grad is not None


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"grad_accum": 2}, "grad_accum"),
        ({"max_grad_norm": 1.0}, "max_grad_norm"),
        ({"precision": "fp16"}, "fp16"),
        ({"world_size": 2}, "DDP"),
        ({"fsdp": True}, "FSDP"),
    ],
)
def test_refuses_what_needs_every_gradient_first(kwargs, word):
    args = {"grad_accum": 1, "max_grad_norm": None, "precision": "fp32", "world_size": 1, "fsdp": False, **kwargs}
    with pytest.raises(ValueError, match=word):
        check_in_backward(**args)
    check_in_backward(1, None, "bf16", 1, False)  # allowed


def test_auto_is_on_wherever_it_gives_the_ordinary_update():
    ok = {"grad_accum": 1, "max_grad_norm": None, "precision": "bf16", "world_size": 1, "fsdp": False}
    assert resolve_in_backward("auto", **ok) and resolve_in_backward(True, **ok)
    assert not resolve_in_backward(False, **ok)
    for change in ({"grad_accum": 2}, {"max_grad_norm": 1.0}, {"precision": "fp16"}, {"world_size": 2}, {"fsdp": True}):
        args = {**ok, **change}
        assert resolve_in_backward("auto", **args) is False and resolve_in_backward(False, **args) is False
        with pytest.raises(ValueError, match="cannot be used with"):
            resolve_in_backward(True, **args)
    with pytest.raises(ValueError, match="true, false or auto"):
        resolve_in_backward("yes", **ok)


@pytest.mark.slow
def test_pretraining_run_in_backward_gives_the_same_weights_and_resumes(tmp_path):
    from albef.checkpoints.files import load_checkpoint
    from albef.data.cli import write_shapes
    from albef.recipes import load_recipe
    from albef.training.loop import TrainRun

    data = tmp_path / "shapes"
    write_shapes(data, n=16, image_size=32, seed=1)

    def run(out, steps, *extra, resume=False):
        r = TrainRun(
            load_recipe(
                None,
                [
                    "model.preset=albef-tiny",
                    "model.overrides={queue_size: 32}",
                    f"data.train_files=[{data / 'pretrain.json'}]",
                    f"data.image_root={data}",
                    "data.num_workers=0",
                    "data.min_seen_for_bad_check=16",
                    "train.batch_size=4",
                    f"train.max_steps={steps}",
                    "train.lr=1e-3",
                    "train.seed=3",
                    "train.checkpoint_every=0",
                    "train.device=cpu",
                    f"output_dir={out}",
                    *extra,
                ],
            ),
            resume=resume,
        )
        r.fit()
        assert isinstance(r.optimizer, AdamWInBackward) == ("train.optimizer_in_backward=false" not in extra)
        assert all(p.grad is None for p in r.trainer.parameters())
        if "train.grad_checkpointing=vision" in extra:  # the ViTs recompute, the text encoders keep
            for owner in (r.trainer.model, r.trainer.model_m):
                assert owner.visual_encoder.grad_checkpointing and not owner.text_encoder.grad_checkpointing
        return load_checkpoint(out / "checkpoint_last.pt")

    def same(a, b):
        assert a["model"].keys() == b["model"].keys()
        for k, v in a["model"].items():
            torch.testing.assert_close(b["model"][k], v, atol=1e-6, rtol=0, msg=k)
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()

    lean = ("train.optimizer_in_backward=true", "train.grad_checkpointing=true")
    a = run(tmp_path / "a", 5, "train.optimizer_in_backward=false")
    same(a, run(tmp_path / "b", 5, *lean))
    same(a, run(tmp_path / "d", 5, "train.grad_checkpointing=vision"))  # and AdamW in the backward (auto)
    run(tmp_path / "c", 2, *lean)  # stopped after 2 steps, resumed to 5
    same(a, run(tmp_path / "c", 5, *lean, resume=True))


def test_lr_scale_longest_prefix_wins():
    scale = {"text_encoder": 0.1, "text_encoder.layer.3": 1.0, "vision.": 0.5}
    assert lr_scale_of("text_encoder.layer.0.attention.query.weight", scale) == 0.1
    assert lr_scale_of("text_encoder.layer.3.crossattention.key.weight", scale) == 1.0
    assert lr_scale_of("text_encoder.layer.30.output.dense.weight", scale) == 0.1  # layer.3 is not a prefix of it
    assert lr_scale_of("vision.blocks.0.norm1.weight", scale) == 0.5
    assert lr_scale_of("itm_head.weight", scale) == 1.0
    assert lr_scale_of("anything", None) == 1.0


def test_lr_scale_scales_the_first_adamw_step():
    """AdamW's first step moves each weight by lr (|m / sqrt(v)| = 1) after decoupled decay
    lr * wd * p: with a multiplier s both are s times as large, and s = 0 freezes the tensor."""
    torch.manual_seed(0)
    model = Tied()
    lr, wd = 1e-2, 0.1
    opt = build_optimizer(model, lr, wd, lr_scale={"hidden": 0.5, "hidden.bias": 0.0})
    assert sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in opt.param_groups) == [
        (0.0, 0.0, 1),
        (0.5, wd, 1),
        (1.0, 0.0, 3),
        (1.0, wd, 1),
    ]
    before = {k: v.clone() for k, v in model.named_parameters()}
    ((x, y),) = _batches(1)
    _train(model, opt, [(x, y)], [lr])
    after = dict(model.named_parameters())
    assert torch.equal(after["hidden.bias"], before["hidden.bias"])
    for name, s in (("hidden.weight", 0.5), ("emb.weight", 1.0)):
        step = (after[name] - before[name] * (1 - lr * s * wd)).abs()
        moved = step > 0
        assert moved.float().mean() > 0.5, name
        torch.testing.assert_close(step[moved], torch.full_like(step[moved], lr * s), rtol=1e-3, atol=0)


def test_lr_scale_unscaled_is_the_reference_grouping():
    model = Tied()
    groups = build_optimizer(model, 1e-3, 0.02).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.02]  # no decay first, as the reference
    assert {id(p) for p in groups[1]["params"]} == {id(model.emb.weight), id(model.hidden.weight)}


def test_lr_scale_unknown_prefix_or_bad_value_is_an_error():
    with pytest.raises(ValueError, match="text_encoder"):
        build_optimizer(Tied(), 1e-3, 0.02, lr_scale={"text_encoder": 0.1})
    for bad in (-0.1, "fast", float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            build_optimizer(Tied(), 1e-3, 0.02, lr_scale={"hidden": bad})
    with pytest.raises(ValueError, match="give the prefix whole"):  # a dotted override nests
        build_optimizer(Tied(), 1e-3, 0.02, lr_scale={"hidden": {"bias": 0.1}})
    groups = build_optimizer(Tied(), 1e-3, 0.02, lr_scale={"hidden": "1e-1"}).param_groups  # YAML's string
    assert sorted(g["lr_scale"] for g in groups) == [0.1, 0.1, 1.0, 1.0]
