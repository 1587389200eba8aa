"""bf16 on the CPU: training under autocast close to float32 with float32 weights and AdamW state,
``precision: auto`` following the hardware, and evaluation / the API under ``--precision bf16``."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from albef import precision
from albef.checkpoints import save_pretrained
from albef.cli import main as cli_main
from albef.data.cli import write_shapes
from albef.models.albef import ALBEF
from albef.precision import native_bf16, resolve_precision
from albef.recipes import load_recipe
from albef.training.loop import TrainRun

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training_run import _losses, _overrides  # the same tiny runs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    write_shapes(d, n=64, image_size=32, seed=1, test=8)
    return d


def _cpu_bf16(monkeypatch, features: tuple[str, ...]) -> None:
    """Pretend the CPU has (or lacks) native bf16."""
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: features)


def _maybe_slow_warning():
    """Explicit bf16 on a CPU without AVX512_BF16 / AMX warns that it is slow; on one with it, nothing."""
    return nullcontext() if native_bf16("cpu") else pytest.warns(UserWarning, match="slower than fp32")


# -- (a) training ------------------------------------------------------------------------------
STEPS = 5
# bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 ≈ 0.2 % (relative); the products
# accumulate in float32 and the losses are computed in float32, so a loss moves by a few roundings'
# worth, not by their sum over the layers. Measured on this tiny model, seed 3 (AMD EPYC with
# AVX512_BF16, torch 2.14.1), largest relative difference over the 5 steps: loss_itc 1.7e-3 (its logits
# are sim / 0.07, which magnifies the features' rounding), total 7.8e-4, loss_itm 1.1e-4, loss_mlm 4e-5
# (3.1e-3 over 8 steps). The bound 1e-2 is 6x the worst; the losses must also differ at all, or
# autocast did not run.
LOSS_RTOL = 1e-2


def test_bf16_training_on_the_cpu_is_close_to_fp32_and_keeps_float32_state(shapes, tmp_path):
    runs, losses = {}, {}
    for prec in ("fp32", "bf16"):
        out = tmp_path / prec
        recipe = load_recipe(
            None, _overrides(shapes, out, train__max_steps=STEPS, train__precision=prec, train__device="cpu")
        )
        with _maybe_slow_warning() if prec == "bf16" else nullcontext():
            runs[prec] = TrainRun(recipe)
        runs[prec].fit()
        losses[prec] = _losses(out)
    assert runs["fp32"].amp_dtype is None and runs["bf16"].amp_dtype is torch.bfloat16
    assert len(losses["fp32"]) == len(losses["bf16"]) == STEPS
    worst = 0.0
    for a, b in zip(losses["fp32"], losses["bf16"], strict=True):
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            assert b[k] == pytest.approx(a[k], rel=LOSS_RTOL), (a["step"], k, a[k], b[k])
            worst = max(worst, abs(a[k] - b[k]) / abs(a[k]))
    assert worst > 0, "bf16 gave float32's losses exactly: autocast did not run"
    run = runs["bf16"]
    # master weights, buffers (the queues) and the AdamW moments stay float32; autocast only casts copies
    assert {p.dtype for p in run.trainer.parameters()} == {torch.float32}
    assert {b.dtype for b in run.trainer.buffers() if b.is_floating_point()} == {torch.float32}
    state = [v for s in run.optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    assert state and {v.dtype for v in state} == {torch.float32}
    ckpt = torch.load(tmp_path / "bf16" / "checkpoint_last.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    assert ckpt["recipe"]["train"]["precision"] == "bf16"


def _bf16_checkpointed_step(context):
    """Loss and gradients of one bf16 step of a seeded albef-tiny pretrainer whose encoders
    recompute their blocks in the backward, its forward under ``context``."""
    from albef.config import get_preset
    from albef.training.pretrain import ALBEFPretrainer
    from tests.helpers import text_batch

    torch.manual_seed(0)
    trainer = ALBEFPretrainer(ALBEF(get_preset("albef-tiny"))).train()
    trainer.model.set_grad_checkpointing("all")
    ids, mask = text_batch(4, 12)
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)  # dropout
    with context:
        out = trainer(images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(3), enqueue=False)
    out.loss.backward()
    return out.loss, {n: p.grad for n, p in trainer.named_parameters() if p.grad is not None}


def test_checkpointed_bf16_step_casts_without_the_cache_to_the_same_values():
    """With gradient checkpointing the training forward runs autocast without its weight cache
    (which would hold a bf16 copy of every weight to the end of the forward); the casts it makes
    instead are the same roundings, so the step is the cached step bit for bit."""
    loss, grads = _bf16_checkpointed_step(precision.training_autocast("cpu", torch.bfloat16, checkpointing=True))
    ref_loss, ref_grads = _bf16_checkpointed_step(torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name
    with precision.training_autocast("cpu", torch.bfloat16, checkpointing=True):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
    with precision.training_autocast("cpu", torch.bfloat16, checkpointing=False):
        assert torch.is_autocast_cache_enabled()
    with precision.training_autocast("cpu", None, checkpointing=False):
        assert not torch.is_autocast_enabled("cpu")


def test_the_training_loop_drops_the_weight_cache_only_with_checkpointing(shapes, tmp_path, monkeypatch):
    from albef.training import loop

    seen = []
    real = loop.training_autocast

    def spy(device, dtype, checkpointing):
        seen.append((dtype, checkpointing))
        return real(device, dtype, checkpointing)

    monkeypatch.setattr(loop, "training_autocast", spy)
    for ckpt in (False, True):
        recipe = load_recipe(
            None,
            _overrides(
                shapes,
                tmp_path / str(ckpt),
                train__max_steps=1,
                train__precision="bf16",
                train__device="cpu",
                train__grad_checkpointing=ckpt,
            ),
        )
        with _maybe_slow_warning():
            TrainRun(recipe).fit()
    assert seen == [(torch.bfloat16, False), (torch.bfloat16, True)]


def test_distillation_losses_are_float32_under_cpu_autocast():
    """CPU autocast keeps log_softmax / softmax in bf16 (CUDA's runs them in float32); the soft-target
    losses upcast themselves, and cross-entropy is float32 by autocast's own policy."""
    from albef.training.finetune import soft_target_loss
    from albef.training.objectives import mlm_loss, soft_cross_entropy

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 16, generator=g), torch.randn(16, 50, generator=g)
    labels = torch.randint(50, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, teacher = x @ w, (x @ w) * 0.5
        assert logits.dtype is torch.bfloat16
        assert torch.nn.functional.cross_entropy(logits, labels).dtype is torch.float32
        assert soft_cross_entropy(logits, teacher.softmax(-1)).dtype is torch.float32
        loss, ce, distill = mlm_loss(logits, labels, teacher, 0.4)
        assert loss.dtype is ce.dtype is distill.dtype is torch.float32
        assert soft_target_loss(logits, labels, teacher, 0.4).dtype is torch.float32
    ref = mlm_loss(logits.float(), labels, teacher.float(), 0.4)[0]
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)  # the same bf16 logits, float32 arithmetic


def test_fp16_is_cuda_only_and_bad_values_are_refused(shapes, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu", "train.precision")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        TrainRun(load_recipe(None, _overrides(shapes, tmp_path, train__precision="fp16", train__device="cpu")))
    with pytest.raises(ValueError, match="train.precision"):
        load_recipe(None, ["train.precision=fp8"])
    assert load_recipe(None, ["train.precision=auto"]).train.precision == "auto"
    assert load_recipe(None, []).train.precision == "fp32"  # the authors' recipes stay float32


# -- (b) auto ----------------------------------------------------------------------------------
def test_auto_follows_the_cpu(monkeypatch, shapes, tmp_path, caplog):
    _cpu_bf16(monkeypatch, ())
    assert resolve_precision("auto", "cpu") == "fp32"
    with caplog.at_level(logging.INFO, logger="albef.precision"):
        run = TrainRun(
            load_recipe(None, _overrides(shapes, tmp_path / "plain", train__precision="auto", train__device="cpu"))
        )
    run.metrics.close()
    assert run.precision == "fp32" and run.amp_dtype is None
    assert "train.precision=auto: fp32 on cpu (the CPU has neither AVX512_BF16 nor AMX-BF16)" in caplog.text
    with pytest.warns(UserWarning, match="without native bfloat16"):  # explicit bf16 still works, slowly
        assert resolve_precision("bf16", "cpu") == "bf16"

    _cpu_bf16(monkeypatch, ("avx512_bf16",))
    assert resolve_precision("auto", "cpu") == "bf16"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="albef.precision"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow-bf16 warning where it is native
        run = TrainRun(
            load_recipe(None, _overrides(shapes, tmp_path / "native", train__precision="auto", train__device="cpu"))
        )
        assert resolve_precision("bf16", "cpu") == "bf16"
    run.metrics.close()
    assert run.precision == "bf16" and run.amp_dtype is torch.bfloat16
    assert "train.precision=auto: bf16 on cpu (the CPU has AVX512_BF16)" in caplog.text


def test_cpu_detection_reads_the_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n"
    )
    assert {"avx512_bf16", "amx_bf16"} <= precision._cpuinfo_flags(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not precision._cpuinfo_flags(info) & set(precision.BF16_CPU_FLAGS)
    assert precision._cpuinfo_flags(tmp_path / "missing") == set()
    # on this machine: whatever /proc/cpuinfo lists is found (PyTorch's probes may only add to it)
    listed = precision._cpuinfo_flags() & set(precision.BF16_CPU_FLAGS)
    assert listed <= set(precision.cpu_bf16_features())
    assert native_bf16("cpu") == bool(precision.cpu_bf16_features())


# -- (c) inference -----------------------------------------------------------------------------
# Scores of a bf16-autocast evaluation vs float32, same model and data. Cosines of unit vectors are
# in [-1, 1], so a relative rounding of ~2^-9 per rounded stage is also their absolute error; the
# features pass a few such stages and the cosines / ITM logits are then computed in float32.
# Measured (AMD EPYC, torch 2.14.1, the tiny preset, 8 images x 16 texts): largest cosine difference
# 2.7e-3 (the cosines spread with std 0.044), largest ITM-logit difference 8.4e-4 (|logits| <= 0.12),
# the API's similarity 1.9e-3. Bounds 1e-2: 3.7x the worst cosine, 12x the ITM logit.
COSINE_ATOL = ITM_ATOL = 1e-2


@pytest.fixture(scope="module")
def tiny_model_dir(shapes):
    torch.manual_seed(0)
    from albef.config import get_preset

    save_pretrained(ALBEF(get_preset("albef-tiny")), shapes / "model")
    return shapes / "model"


def test_evaluate_retrieval_with_bf16_gives_float32_scores_close_to_fp32(shapes, tiny_model_dir, tmp_path, monkeypatch):
    from albef.evaluation import retrieval

    seen: dict[str, list] = {}
    plain = retrieval.retrieval_metrics

    def record(score_i2t, score_t2i, img2txt, txt2img):  # what the command ranks
        seen[current].append(score_i2t.clone())
        return plain(score_i2t, score_t2i, img2txt, txt2img)

    monkeypatch.setattr(retrieval, "retrieval_metrics", record)
    metrics = {}
    for current in ("fp32", "bf16"):
        seen[current] = []
        out = tmp_path / f"{current}.json"
        with _maybe_slow_warning() if current == "bf16" else nullcontext():
            # k = every text: each pair is re-ranked in both runs, so the full matrices compare
            assert (
                cli_main(
                    [
                        "evaluate",
                        "retrieval",
                        "--model",
                        str(tiny_model_dir),
                        "--data",
                        str(shapes / "retrieval_test.json"),
                        "--image-root",
                        str(shapes),
                        "--k",
                        "16",
                        "--device",
                        "cpu",
                        "--precision",
                        current,
                        "--out",
                        str(out),
                    ]
                )
                == 0
            )
        metrics[current] = json.loads(out.read_text())
    (cos32, itm32), (cos16, itm16) = seen["fp32"], seen["bf16"]
    assert cos16.dtype is itm16.dtype is torch.float32  # float32 scores: bf16 would tie near-equal ones
    assert not torch.equal(cos16, cos32)  # autocast ran
    torch.testing.assert_close(cos16, cos32, rtol=0, atol=COSINE_ATOL)
    torch.testing.assert_close(itm16, itm32, rtol=0, atol=ITM_ATOL)
    assert metrics["bf16"]["n_texts"] == metrics["fp32"]["n_texts"] == 16


def test_pipeline_precision(tiny_model_dir, monkeypatch):
    from albef.api import Pipeline

    _cpu_bf16(monkeypatch, ("avx512_bf16",))  # no slow-path warning; the arithmetic is the same either way
    fp32 = Pipeline.from_pretrained(tiny_model_dir, device="cpu")
    bf16 = Pipeline.from_pretrained(tiny_model_dir, device="cpu", precision="bf16")
    assert fp32.precision == "fp32" and bf16.precision == "bf16" and bf16.dtype is torch.float32
    assert Pipeline.from_pretrained(tiny_model_dir, device="cpu", precision="auto").precision == "bf16"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square", "a green triangle"]
    s32, s16 = fp32.similarity(images, texts), bf16.similarity(images, texts)
    assert s16.dtype is torch.float32 and bf16.encode_image(images).dtype is torch.float32
    assert not torch.equal(s16, s32)
    torch.testing.assert_close(s16, s32, rtol=0, atol=COSINE_ATOL)
    m32, m16 = fp32.match(images, texts), bf16.match(images, texts)
    assert m16.dtype is torch.float32
    torch.testing.assert_close(m16, m32, rtol=0, atol=ITM_ATOL)
    hits = bf16.retrieve("a red circle", images, k=3, top=3)
    assert sorted(h.index for h in hits) == [0, 1, 2]
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Pipeline.from_pretrained(tiny_model_dir, device="cpu", precision="fp16")


def test_inference_commands_take_precision(tiny_model_dir, shapes, tmp_path, capsys, monkeypatch):
    _cpu_bf16(monkeypatch, ("avx512_bf16",))
    image = next(p for p in sorted(shapes.rglob("*.png")))
    assert (
        cli_main(
            [
                "predict",
                "score",
                "--model",
                str(tiny_model_dir),
                "--image",
                str(image),
                "--text",
                "a circle",
                "--device",
                "cpu",
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    assert "a circle" in capsys.readouterr().out
    from albef.cli.serve import parser

    assert parser().parse_args(["--precision", "auto"]).precision == "auto"
    assert parser().parse_args([]).precision == "fp32"
    with pytest.raises(SystemExit):
        parser().parse_args(["--precision", "fp16"])  # inference offers fp32 / bf16 / auto
