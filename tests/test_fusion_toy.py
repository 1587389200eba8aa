"""bench/fusion_toy.py: the scenes say what their captions say, the twins are false, the scoring is exact."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fusion_toy as T  # noqa: E402

OPPOSITE = {T.LEFT: T.RIGHT, T.RIGHT: T.LEFT, T.ABOVE: T.BELOW, T.BELOW: T.ABOVE}


def _place(cells: torch.Tensor, kind: int) -> tuple[int, int] | None:
    """Top-left cell of the 2 x 2 object of ``kind`` in a flat grid, read back from the cells."""
    where = (cells.view(T.GRID, T.GRID) == kind).nonzero()
    if len(where) == 0:
        return None
    assert len(where) == 4  # exactly one 2 x 2 object of the kind
    return int(where[:, 0].min()), int(where[:, 1].min())


def _oracle(cells: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """1 where the caption is true of the cells (both objects present, the relation holds), else 0."""
    out = []
    for c, (_, a, rel, b, _) in zip(cells, ids.tolist(), strict=True):
        pa, pb = _place(c, a - T.OBJECT0), _place(c, b - T.OBJECT0)
        out.append(float(pa is not None and pb is not None and T.relation(pa, pb) == rel))
    return torch.tensor(out)


@pytest.mark.parametrize("horizontal,third", [(False, False), (True, False), (False, True)])
def test_scenes_hold_their_caption_and_no_twin_does(horizontal, third):
    objects = 5
    scenes = T.draw_scenes(300, torch.Generator().manual_seed(0), objects, horizontal, third)
    t = T.tensors(scenes, objects)
    assert _oracle(t["cells"], t["caption"]).tolist() == [1.0] * 300
    for cells, ids in ((t["cells"], t["swapped"]), (t["mirror"], t["caption"]), (t["cells"], t["changed"])):
        assert _oracle(cells, ids).sum() == 0
    rels = {s.rel for s in scenes}
    assert rels == ({T.LEFT, T.RIGHT} if horizontal else {T.LEFT, T.RIGHT, T.ABOVE, T.BELOW})
    for s, cells in zip(scenes, t["cells"], strict=True):
        assert s.a != s.b and _place(cells, s.a) == s.place_a and _place(cells, s.b) == s.place_b
        if third:
            kind, place = s.third
            assert kind not in (s.a, s.b) and _place(cells, kind) == place
            assert T.relation(place, s.place_b) != s.rel  # "C rel B" is false: MLM must read the relation
    # the mirror image holds the same objects, each where the other was
    for s, cells, mirror in zip(scenes, t["cells"], t["mirror"], strict=True):
        assert torch.equal(cells.sort().values, mirror.sort().values)
        assert T.relation(_place(mirror, s.a), _place(mirror, s.b)) == OPPOSITE[s.rel]


def test_twin_accuracy_is_exact_for_an_oracle_and_a_presence_reader():
    scenes = T.draw_scenes(200, torch.Generator().manual_seed(1), 6)
    t = T.tensors(scenes, 6)
    assert T.twin_accuracy(_oracle, t) == {"swap": 1.0, "mirror": 1.0, "object": 1.0}

    def presence(cells: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # which objects, not where
        return torch.tensor(
            [float(all((c == w - T.OBJECT0).any() for w in (i[1], i[3]))) for c, i in zip(cells, ids, strict=True)]
        )

    # a tie is not a win: a reader blind to places never prefers the caption to a swapped twin
    assert T.twin_accuracy(presence, t) == {"swap": 0.0, "mirror": 0.0, "object": 1.0}


def test_itm_batch_pairs_each_negative_as_albef_does():
    t = T.tensors(T.draw_scenes(4, torch.Generator().manual_seed(2), 6), 6)
    cells, ids, labels = T.itm_batch(t, "itm")
    assert labels.tolist() == [1] * 4 + [0] * 8
    assert torch.equal(ids[4:8], t["swapped"]) and torch.equal(cells[4:8], t["cells"])  # negative text
    assert torch.equal(ids[8:], t["caption"]) and torch.equal(cells[8:], t["mirror"])  # negative image
    cells, ids, labels = T.itm_batch(t, "all")
    assert labels.tolist() == [1] * 4 + [0] * 12
    assert torch.equal(ids[12:], t["changed"]) and torch.equal(cells[12:], t["cells"])  # an absent object
    cells, ids, labels = T.itm_batch(t, "object")
    assert labels.tolist() == [1] * 4 + [0] * 4 and torch.equal(ids[4:], t["changed"])


def test_main_writes_the_curve(tmp_path):
    out = tmp_path / "toy.json"
    threads = ["--threads", str(torch.get_num_threads())]  # leave the test process's threads as they are
    argv = [str(out), "--steps", "2", "--eval-every", "1", "--width", "32", "--objects", "5", "--third", "--mlm", "1"]
    assert T.main(argv + threads) == 0
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["curve"]] == [0, 1, 2]  # the start, then every step
    assert result["curve"][0]["loss"] is None and result["curve"][1]["loss"] > 0
    assert set(result["curve"][1]) == {
        "step",
        "loss",
        "seconds",
        "swap",
        "mirror",
        "object",
        "mlm_pair",
        "look_mean",
        "look_best",
        "look_other",
    }
    assert result["settings"]["negatives"] == "itm"
    for variant in (["--single-stream", "--pre-ln"], ["--vit-layers", "1", "--bound-init", "2"]):
        assert T.main([str(out), "--steps", "1", "--width", "32", "--negatives", "all", *variant, *threads]) == 0
        assert set(json.loads(out.read_text())["curve"][0]) >= {"swap", "mirror", "object"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mlm", "1"], "needs --third"),  # MLM on the first name needs a third object to choose from
        (["--objects", "2"], "--objects must leave a kind absent"),  # no kind for the changed-object twin
        (["--bound-init", "1", "--single-stream"], "--single-stream has none"),
        (["--pre-ln"], "add --single-stream"),
        (["--fusion-layers", "0"], "--fusion-layers must be at least 1"),
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--bind", "words"], "add --bound-init"),
        (["--init-part", "cross"], "add --init default|normal"),  # BERT's start is what the fusion has
        (["--init", "normal", "--init-part", "cross", "--single-stream"], "--single-stream has none"),
        (["--init", "normal", "--init-std", "0"], "--init-std must be positive"),
        (["--init-std", "0.1"], "add --init normal"),  # a spread for BERT's or PyTorch's start means nothing
        (["--embed-scale", "0"], "--embed-scale must be positive"),
        (["--embed-lr-scale", "-1"], "--embed-lr-scale at least 0"),
        (["--embed-scale", "2", "--bound-init", "1"], "not with --bound-init or --single-stream"),
        (["--embed-scale", "2", "--single-stream"], "not with --bound-init or --single-stream"),
    ],
)
def test_main_refuses_settings_without_meaning(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        T.main([str(tmp_path / "toy.json"), "--steps", "1", *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "toy.json").exists()


def _toy(**settings) -> T.Toy:
    """A ``Toy`` with albef's fusion (main()'s defaults where ``settings`` says nothing)."""
    base = dict(width=128, text_layers=2, fusion_layers=2, objects=14, single_stream=False, pre_ln=False)
    base |= dict(bound_init=0.0, bind="both", vit_layers=0, init="bert", init_std=0.05, init_part="all")
    base |= dict(embed_scale=1.0, zero_biases=False)
    return T.Toy(argparse.Namespace(**{**base, **settings}))


def test_the_toy_fuses_with_albefs_own_layers():
    model = _toy(width=32, text_layers=1, fusion_layers=1, objects=5)
    assert isinstance(model.fusion, T.TextEncoder) and len(model.fusion.fusion_layers) == 1
    t = T.tensors(T.draw_scenes(3, torch.Generator().manual_seed(0), 5), 5)
    assert model.itm(t["cells"], t["caption"]).shape == (3, 2)


def test_held_out_scenes_are_never_drawn_for_training():
    held_out = T.draw_scenes(200, torch.Generator().manual_seed(5), 4, horizontal=True)
    training = T.draw_scenes(2000, torch.Generator().manual_seed(5), 4, True, exclude=frozenset(held_out))
    assert len(training) == 2000 and not set(training) & set(held_out)
    assert set(T.draw_scenes(2000, torch.Generator().manual_seed(5), 4, True)) & set(held_out)  # without: they are


def test_bound_init_starts_the_cross_attention_on_the_named_object():
    t = T.tensors(T.draw_scenes(100, torch.Generator().manual_seed(3), 14), 14)
    uniform = 4 / 65  # an object's 4 cells among 64 and the image's [CLS]
    for scale, low, high in ((0.0, 0.0, 2 * uniform), (2.0, 0.85, 1.0)):
        torch.manual_seed(0)
        model = _toy(bound_init=scale)
        look = model.look(t["cells"], t["caption"])
        assert look.shape == (4,) and low < look.min() and look.max() < high
        # bound, a name looks at its own object, not at the other one the caption names; unbound, at
        # either about as much as a uniform look does
        other = model.look(t["cells"], t["caption"], onto=3)
        assert other.max() < (high if scale == 0 else 0.1) and (scale > 0 or other.min() > uniform / 2)


def test_bind_sets_one_half_of_the_look_or_both():
    t = T.tensors(T.draw_scenes(100, torch.Generator().manual_seed(3), 14), 14)
    torch.manual_seed(0)
    plain = _toy()
    models = {}
    for part in ("both", "words", "attention"):
        torch.manual_seed(0)
        models[part] = _toy(bound_init=2.0, bind=part)
    names = slice(T.OBJECT0, T.OBJECT0 + 14)

    def words(m):
        return m.fusion.embeddings.word_embeddings.weight[names]

    def query(m):
        return m.fusion.fusion_layers[0].crossattention.self.query.weight

    content = models["both"].tokens.content.weight[:-1] * 0.04
    assert torch.equal(words(models["both"]), content) and torch.equal(words(models["words"]), content)
    assert torch.equal(words(models["attention"]), words(plain))  # the other half left as built
    assert torch.equal(query(models["attention"]), 2 * torch.eye(128))
    assert torch.equal(query(models["both"]), query(models["attention"]))
    assert torch.equal(query(models["words"]), query(plain))  # the other half left as built
    looks = {k: m.look(t["cells"], t["caption"]).mean().item() for k, m in models.items()}
    # the names alone leave BERT's near-zero queries (a uniform look: 4 / 65); the identity alone
    # sharpens the look onto objects but has no name to match, so it looks far less than both together
    assert looks["both"] > 0.85 and looks["words"] < 2 * 4 / 65 and 2 * 4 / 65 < looks["attention"] < 0.5


@pytest.mark.parametrize("single_stream", [False, True])
def test_init_default_starts_from_pytorchs_layers_not_berts(single_stream):
    def spread(model):  # the standard deviation of every matrix of the fusion, pooled
        mats = [p for n, p in model.fusion.named_parameters() if p.dim() == 2 and "embed" not in n and "words" not in n]
        return torch.cat([m.detach().flatten() for m in mats]).std().item()

    torch.manual_seed(0)
    bert = _toy(single_stream=single_stream)
    torch.manual_seed(0)
    default = _toy(single_stream=single_stream, init="default")
    assert spread(bert) == pytest.approx(0.02, rel=0.1)  # BERT's N(0, 0.02)
    assert spread(default) > 2 * spread(bert)  # kaiming/xavier-uniform at width 128: several times larger


def _cross_and_rest(model: T.Toy) -> tuple[list[Tensor], list[Tensor]]:
    """The fusion's weight matrices: those of the fusion layers' cross-attention, and every other."""
    cross, rest = [], []
    for n, p in model.fusion.named_parameters():
        if p.dim() == 2:
            (cross if ".crossattention." in n else rest).append(p.detach().clone())
    return cross, rest


@pytest.mark.parametrize("single_stream", [False, True])
def test_init_normal_is_berts_start_at_another_spread(single_stream):
    torch.manual_seed(0)
    model = _toy(single_stream=single_stream, init="normal", init_std=0.05)
    mats = {n: p.detach() for n, p in model.fusion.named_parameters() if p.dim() == 2}
    assert all(m.std().item() == pytest.approx(0.05, rel=0.15) for m in mats.values()), mats.keys()
    linear_biases = [m.bias for m in model.fusion.modules() if isinstance(m, nn.Linear)]
    assert linear_biases and all(not b.any() for b in linear_biases)


@pytest.mark.parametrize("init,spread", [("normal", 0.05), ("default", None)])
def test_init_part_cross_restarts_only_the_cross_attention(init, spread):
    torch.manual_seed(0)
    bert_cross, bert_rest = _cross_and_rest(_toy())
    torch.manual_seed(0)
    model = _toy(init=init, init_part="cross")
    cross, rest = _cross_and_rest(model)
    assert len(cross) == 4 * 2  # query, key, value, output of each of the 2 fusion layers
    assert all(torch.equal(a, b) for a, b in zip(rest, bert_rest, strict=True))  # BERT's, draw for draw
    pooled = torch.cat([c.flatten() for c in cross]).std().item()
    assert pooled == pytest.approx(spread, rel=0.05) if spread else pooled > 2 * 0.02  # PyTorch's at width 128
    assert not any(torch.equal(a, b) for a, b in zip(cross, bert_cross, strict=True))


def test_init_default_draws_each_single_stream_layer_anew():
    # nn.TransformerEncoder deep-copies one layer: PyTorch's start must not leave the layers equal
    torch.manual_seed(0)
    layers = _toy(single_stream=True, init="default").fusion.body.layers
    first, second = (layer.self_attn.in_proj_weight for layer in layers[:2])
    assert not torch.equal(first, second)
    assert all(not layer.self_attn.in_proj_bias.any() and not layer.self_attn.out_proj.bias.any() for layer in layers)


def test_tokens_are_fixed_unless_vit_blocks_are_put_on_top():
    cells = T.grid(T.draw_scenes(1, torch.Generator().manual_seed(4), 5)[0], 5)[None]
    ideal = T.Tokens(32, 5)
    assert not [p for p in ideal.parameters() if p.requires_grad]  # what and where, given, not learned
    x = ideal(cells)
    assert x.shape == (1, 1 + T.GRID**2, 32)
    normed = x[0, 1:]  # each token LayerNormed
    assert torch.allclose(normed.mean(-1), torch.zeros(T.GRID**2), atol=1e-5)
    assert torch.allclose(normed.var(-1, unbiased=False), torch.ones(T.GRID**2), atol=1e-3)
    vit = T.Tokens(32, 5, vit_layers=2)
    trainable = [n for n, p in vit.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("blocks.", "final_norm.")) for n in trainable)
    assert vit(cells).shape == x.shape


def test_embed_scale_keeps_the_start_and_zero_biases_zeroes_the_linears():
    # the same draws at another spread: the text the fusion reads starts the same after LayerNorm
    t = T.tensors(T.draw_scenes(4, torch.Generator().manual_seed(1), 14), 14)
    torch.manual_seed(0)
    plain = _toy(init="default")
    torch.manual_seed(0)
    small = _toy(init="default", embed_scale=0.02)
    tables = [(a, b) for a, b in zip(plain.fusion.modules(), small.fusion.modules(), strict=True)]
    tables = [(a.weight, b.weight) for a, b in tables if isinstance(a, nn.Embedding)]
    assert len(tables) == 3 and all(torch.allclose(b, 0.02 * a) for a, b in tables)
    torch.testing.assert_close(
        small.itm(t["cells"], t["caption"]), plain.itm(t["cells"], t["caption"]), atol=1e-4, rtol=0
    )
    torch.manual_seed(0)
    zeroed = _toy(init="default", zero_biases=True)
    biases = [m.bias for m in zeroed.fusion.modules() if isinstance(m, nn.Linear) and m.bias is not None]
    assert biases and not any(b.any() for b in biases)
    assert any(m.bias.any() for m in plain.fusion.modules() if isinstance(m, nn.Linear) and m.bias is not None)


def test_embed_lr_scale_slows_only_the_fusions_embedding_tables(tmp_path, monkeypatch):
    seen = {}
    real = torch.optim.AdamW

    def spy(groups, **kw):
        seen["groups"] = groups
        return real(groups, **kw)

    monkeypatch.setattr(T.torch.optim, "AdamW", spy)
    T.main(
        [str(tmp_path / "toy.json"), "--steps", "1", "--eval-every", "1", "--embed-lr-scale", "0.02", "--lr", "1e-3"]
    )
    rest, emb = seen["groups"]
    assert rest["lr"] == 1e-3 and emb["lr"] == pytest.approx(2e-5)
    assert len(emb["params"]) == 3  # word, position and token-type tables of albef's text encoder
