"""Ideal image tokens: can ALBEF's fusion layers, from random weights, learn "A left of B"?

    .venv/bin/python bench/fusion_toy.py OUT.json [--negatives swap|itm|object|all] [--steps N]
        [--objects K] [--horizontal] [--third --mlm W] [--single-stream [--pre-ln]] [--lr LR] ...

The main job's model tells which emoji a scene holds and how many, never which is left of which
(docs/results.md). This probe takes the image encoder out of the question. An image is an 8 x 8 grid
of tokens, each the LayerNorm of its content (a fixed random vector per object kind, one for the
background) plus its place (2-D sine-cosine values): every token says exactly what lies under it and
where. Two objects of ``--objects`` kinds cover 2 x 2 cells each, placed so that one relation holds
unambiguously (left of, right of, above, below); the caption is ``[CLS] A rel B [SEP]`` over a
vocabulary of a few dozen words. The text side is albef's own ``TextEncoder`` (``--text-layers``
text-only layers, then ``--fusion-layers`` with cross-attention to the tokens, BERT's initialisation,
no dropout); an ITM head on the fused [CLS] is trained by cross-entropy, positives against:

- ``swap``: the swapped caption ``B rel A`` on the same image (only the relation tells them apart);
- ``itm``: the swapped caption, and the same caption on the mirror image (the objects' places
  exchanged), as ALBEF's ITM draws one negative text and one negative image per positive;
- ``object``: the caption with its first object replaced by one not in the scene (the control: a
  mean over the image answers it);
- ``all``: the three negatives.

``--bound-init S`` starts the first fusion layer's cross-attention looking at the object each name
names (an object's word embedding is its content vector, queries and keys S times the identity), a
probe of what comes after the look; ``--bind words`` or ``--bind attention`` sets only one of the two
(S scales queries and keys, so it does nothing with ``words``). ``--vit-layers N`` puts N trainable
ViT blocks on the tokens before the fusion, as ALBEF's fusion reads a ViT's output. With ``--third``
each scene holds a third object of which the caption's relation is not true, and ``--mlm W`` adds,
with weight W, ALBEF's image-grounded MLM on the first object's name (masked, then predicted from its
fused state by a linear head): naming it needs the relation, since two objects other than B are
present.
``--single-stream`` replaces the fusion by one transformer over the text and image tokens together
(PyTorch's ``TransformerEncoder``, post- or ``--pre-ln``, BERT's initialisation), a control for
whether the difficulty is ALBEF's cross-attention or attention from random weights in general.
``--init default`` starts either from PyTorch's default initialisation of each layer (the linears'
spread 1.3-2.6 times BERT's at width 128, biases drawn, embeddings N(0, 1)) instead of BERT's N(0, 0.02);
``--init normal --init-std S`` from BERT's start at another spread, N(0, S) with zero biases.
``--init-part cross`` restarts only the fusion layers' cross-attention so, the rest BERT's (as the
library's ``cross_attention_init`` does, where the fusion layers' other weights are a pretrained BERT's).

At the start and every ``--eval-every`` steps, on 1,000 held-out scenes: ITM's choice of the caption
over its swapped twin (``swap``), over the caption on the mirror image (``mirror``), over the
caption with an object changed (``object``), each chance 50 % (a tie counts as a miss); with
``--third``, the MLM's choice of the first object over the third (``mlm_pair``, chance 50 %); for
albef's fusion, the first fusion layer's attention from the first name onto its object's cells, the
mean over heads and the best head (``look_mean``, ``look_best``; a uniform look 4 / 65), and onto
the other named object's cells, the mean over heads (``look_other``: a look at objects in general
puts as much there as on its own). The held-out scenes are never drawn for training. OUT holds the
settings and the curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from albef.config import TextConfig, VisionConfig  # noqa: E402
from albef.models.bert import TextEncoder  # noqa: E402
from albef.models.vit import Block, sincos_pos_embed  # noqa: E402

GRID = 8  # cells a side; an object covers 2 x 2
CLS, SEP, MASK = 1, 2, 3
LEFT, RIGHT, ABOVE, BELOW = 4, 5, 6, 7
OBJECT0 = 10  # word id of object kind 0
VOCAB = 64


class Scene(NamedTuple):
    a: int  # object kinds; the caption says "a rel b"
    b: int
    place_a: tuple[int, int]  # top-left cell (row, column) of each 2 x 2 object
    place_b: tuple[int, int]
    rel: int
    third: tuple[int, tuple[int, int]] | None = None  # (kind, place) of an object the caption is not about


def relation(p: tuple[int, int], q: tuple[int, int]) -> int | None:
    """The relation of the object at ``p`` to the one at ``q`` when unambiguous: apart by at least
    one object's width along one axis, overlapping along the other; else None."""
    (r1, c1), (r2, c2) = p, q
    if abs(c1 - c2) >= 2 and abs(r1 - r2) <= 1:
        return LEFT if c1 < c2 else RIGHT
    if abs(r1 - r2) >= 2 and abs(c1 - c2) <= 1:
        return ABOVE if r1 < r2 else BELOW
    return None


def _overlap(p: tuple[int, int], q: tuple[int, int]) -> bool:
    return max(abs(p[0] - q[0]), abs(p[1] - q[1])) < 2


def draw_scenes(
    n: int,
    gen: torch.Generator,
    objects: int,
    horizontal: bool = False,
    third: bool = False,
    exclude: frozenset[Scene] = frozenset(),
) -> list[Scene]:
    """``n`` scenes of two distinct object kinds in an unambiguous relation (left/right only with
    ``horizontal``); with ``third``, a third kind placed where the caption's relation does not hold.
    A scene in ``exclude`` (the held-out set) is drawn again, so that held out means never trained on."""

    def rand(k: int) -> list[int]:
        return torch.randint(GRID - 1, (k,), generator=gen).tolist()

    out = []
    for _ in range(n):
        a, b = torch.randperm(objects, generator=gen)[:2].tolist()
        while True:
            ra, ca, rb, cb = rand(4)
            rel = relation((ra, ca), (rb, cb))
            if rel is not None and (not horizontal or rel in (LEFT, RIGHT)):
                break
        extra = None
        if third:
            c = torch.randperm(objects, generator=gen)[:3].tolist()
            c = next(k for k in c if k not in (a, b))
            while True:
                p = tuple(rand(2))
                if not _overlap(p, (ra, ca)) and not _overlap(p, (rb, cb)) and relation(p, (rb, cb)) != rel:
                    break
            extra = (c, p)
        scene = Scene(a, b, (ra, ca), (rb, cb), rel, extra)
        if scene not in exclude:
            out.append(scene)
    return out if len(out) == n else out + draw_scenes(n - len(out), gen, objects, horizontal, third, exclude)


def grid(scene: Scene, objects: int, mirror: bool = False) -> Tensor:
    """The scene's cells [GRID * GRID] of object kinds (``objects`` = background); ``mirror``
    exchanges the two named objects' places, which makes the caption false."""
    cells = torch.full((GRID, GRID), objects, dtype=torch.long)
    pa, pb = (scene.place_b, scene.place_a) if mirror else (scene.place_a, scene.place_b)
    for kind, (r, c) in ((scene.a, pa), (scene.b, pb)) + ((scene.third,) if scene.third else ()):
        cells[r : r + 2, c : c + 2] = kind
    return cells.flatten()


def caption(scene: Scene, swap: bool = False, first: int | None = None) -> list[int]:
    """``[CLS] A rel B [SEP]``; ``swap`` exchanges the names, ``first`` replaces A's kind."""
    a, b = (scene.b, scene.a) if swap else (scene.a, scene.b)
    a = a if first is None else first
    return [CLS, OBJECT0 + a, scene.rel, OBJECT0 + b, SEP]


def absent_kind(scene: Scene, objects: int) -> int:
    """The first object kind after A's (cyclically) that the scene does not hold."""
    present = {scene.a, scene.b} | ({scene.third[0]} if scene.third else set())
    k = (scene.a + 1) % objects
    while k in present:
        k = (k + 1) % objects
    return k


class Tokens(nn.Module):
    """Ideal image tokens: LayerNorm(content of the cell + its place), the [CLS] their mean; with
    ``vit_layers``, trainable pre-norm ViT blocks (albef's, timm's initialisation) and a final
    LayerNorm on top, as the fusion reads a ViT's output."""

    def __init__(self, width: int, objects: int, vit_layers: int = 0):
        super().__init__()
        self.content = nn.Embedding(objects + 1, width)
        nn.init.normal_(self.content.weight)  # fixed, as large as the place's values
        self.register_buffer("place", sincos_pos_embed(GRID, width))  # [GRID * GRID, W]
        self.norm = nn.LayerNorm(width)
        self.requires_grad_(False)
        cfg = VisionConfig(width=width, num_heads=4)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(vit_layers))
        self.final_norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps) if vit_layers else None
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, cells: Tensor) -> Tensor:  # [B, N] -> [B, 1 + N, W]
        x = self.content(cells) + self.place
        x = self.norm(torch.cat([x.mean(1, keepdim=True), x], 1))
        for block in self.blocks:
            x = block(x)
        return x if self.final_norm is None else self.final_norm(x)


class SingleStream(nn.Module):
    """The control: one transformer over [text; image] tokens, no cross-attention."""

    def __init__(self, width: int, depth: int, pre_ln: bool, bert_init: bool = True):
        super().__init__()
        self.words = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(16, width)
        self.stream = nn.Embedding(2, width)  # text or image
        self.norm = nn.LayerNorm(width)  # the words at the image tokens' scale, as BERT's embeddings are
        layer = nn.TransformerEncoderLayer(
            width, 4, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=pre_ln
        )
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        for m in self.modules() if bert_init else ():  # BERT's initialisation, as the fusion it stands beside
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, ids: Tensor, image: Tensor) -> Tensor:  # -> [B, L + N, W], text first
        L = ids.shape[1]
        text = self.norm(self.words(ids) + self.positions.weight[:L] + self.stream.weight[0])  # BERT's embeddings
        return self.body(torch.cat([text, image + self.stream.weight[1]], 1))


def restart(fusion: nn.Module, init: str, std: float = 0.05, part: str = "all") -> None:
    """Start the fusion's linears, embeddings and attention projections from PyTorch's default
    (``init`` "default": each layer drawn anew, as PyTorch builds it) or from N(0, ``std``) with zero
    biases (``init`` "normal": BERT's start at another spread); ``part`` "cross" restarts only albef's
    fusion layers' cross-attention, as ``cross_attention_init`` does in the library."""
    if part == "cross":
        assert isinstance(fusion, TextEncoder), "--init-part cross needs albef's fusion layers"
        if init == "default":
            fusion.reset_cross_attention()  # the library's own cross_attention_init "default"
            return
        fusion = nn.ModuleList(layer.crossattention for layer in fusion.fusion_layers)
    with torch.no_grad():
        for m in fusion.modules():
            if isinstance(m, nn.MultiheadAttention) and init == "normal":  # the single stream's attention
                m.in_proj_weight.normal_(0, std)
                m.in_proj_bias.zero_()
            if not isinstance(m, (nn.Linear, nn.Embedding)):
                continue
            if init == "default":
                m.reset_parameters()
                continue
            m.weight.normal_(0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
        if init == "default":  # after its output linear, as PyTorch builds it (zero biases, xavier in_proj)
            for m in fusion.modules():
                if isinstance(m, nn.MultiheadAttention):
                    m._reset_parameters()


class Toy(nn.Module):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        W, depth = args.width, args.text_layers + args.fusion_layers
        self.tokens = Tokens(W, args.objects, args.vit_layers)
        if args.single_stream:
            self.fusion: nn.Module = SingleStream(W, depth, args.pre_ln, bert_init=args.init == "bert")
        else:
            cfg = TextConfig(
                vocab_size=VOCAB,
                hidden_size=W,
                num_layers=depth,
                fusion_layer=args.text_layers,
                num_heads=4,
                intermediate_size=4 * W,
                max_position_embeddings=16,
                encoder_width=W,
                hidden_dropout=0.0,
                attention_dropout=0.0,
            )
            self.fusion = TextEncoder(cfg)
        if args.init != "bert":  # every layer drawn anew (nn.TransformerEncoder copies one layer)
            restart(self.fusion, args.init, args.init_std, args.init_part)
        with torch.no_grad():
            for m in self.fusion.modules():
                if isinstance(m, nn.Linear) and m.bias is not None and args.zero_biases:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding):  # the same draws at another spread: LayerNorm follows them
                    m.weight.mul_(args.embed_scale)
        self.itm_head = nn.Linear(W, 2)
        self.mlm_head = nn.Linear(W, args.objects)
        if args.bound_init:
            self.bind(args.bound_init, args.bind)

    @torch.no_grad()
    def bind(self, scale: float, part: str = "both") -> None:
        """Start the first fusion layer's cross-attention looking at the object each name names: an
        object's word embedding is its content vector (at twice the position embeddings' scale), and
        queries and keys are ``scale`` times the identity, so a name's query meets its own object's cells
        (a probe of what comes after the look). ``part`` "words" or "attention" sets only that half:
        the names in the image tokens' space, or queries and keys the identity over BERT's words."""
        fusion = self.fusion
        assert isinstance(fusion, TextEncoder), "--bound-init needs albef's fusion layers"
        words = fusion.embeddings.word_embeddings.weight
        content = self.tokens.content.weight[:-1]  # [objects, W], standard deviation 1
        if part in ("both", "words"):
            # twice the scale of BERT's position embeddings (0.02), so that a name still says where it stands
            words[OBJECT0 : OBJECT0 + len(content)] = content * 0.04
        if part == "words":
            return
        attention = fusion.fusion_layers[0].crossattention.self
        for linear in (attention.query, attention.key):
            linear.weight.copy_(torch.eye(linear.weight.shape[0]) * scale)
            linear.bias.zero_()

    def fused(self, cells: Tensor, ids: Tensor) -> Tensor:  # [B, N], [B, L] -> [B, L, W]
        image = self.tokens(cells)
        if isinstance(self.fusion, TextEncoder):
            return self.fusion(ids, torch.ones_like(ids), image)
        return self.fusion(ids, image)[:, : ids.shape[1]]

    def itm(self, cells: Tensor, ids: Tensor) -> Tensor:  # -> [B, 2] logits
        return self.itm_head(self.fused(cells, ids)[:, 0])

    @torch.no_grad()
    def look(self, cells: Tensor, ids: Tensor, onto: int = 1) -> Tensor:
        """Each head's attention weight, in the first fusion layer's cross-attention, from the first
        name onto the cells of the object named at caption position ``onto`` (1: the first name's own,
        3: the other's), averaged over scenes: [heads] (a uniform look: 4 / 65)."""
        fusion = self.fusion
        assert isinstance(fusion, TextEncoder)
        mask = torch.ones_like(ids)
        hidden = fusion.encode_text(ids, mask)
        layer = fusion.fusion_layers[0]
        x = layer.attention(hidden, hidden, fusion.self_mask(mask))
        attention = layer.crossattention.self
        p = attention.probabilities(
            attention.heads(attention.query(x)), attention.heads(attention.key(self.tokens(cells))), None
        )
        on = torch.cat(
            [torch.zeros_like(cells[:, :1], dtype=torch.bool), cells == ids[:, onto : onto + 1] - OBJECT0], 1
        ).float()  # [B, 1 + N]
        return (p[:, :, 1] * on[:, None]).sum(-1).mean(0)  # [B, h, 1 + N] -> [h]

    def name_first(self, cells: Tensor, ids: Tensor) -> Tensor:  # -> [B, objects] logits
        masked = ids.clone()
        masked[:, 1] = MASK
        return self.mlm_head(self.fused(cells, masked)[:, 1])


def tensors(scenes: list[Scene], objects: int) -> dict[str, Tensor]:
    """Cells and captions of each scene, its mirror image, its swapped and its changed caption."""
    return {
        "cells": torch.stack([grid(s, objects) for s in scenes]),
        "mirror": torch.stack([grid(s, objects, mirror=True) for s in scenes]),
        "caption": torch.tensor([caption(s) for s in scenes]),
        "swapped": torch.tensor([caption(s, swap=True) for s in scenes]),
        "changed": torch.tensor([caption(s, first=absent_kind(s, objects)) for s in scenes]),
    }


def twin_accuracy(match: Callable[[Tensor, Tensor], Tensor], t: dict[str, Tensor]) -> dict[str, float]:
    """How often ``match(cells, ids)`` (a score per row) prefers the true pair to each twin."""
    true = match(t["cells"], t["caption"])

    def beats(other: Tensor) -> float:
        return (true > other).float().mean().item()

    return {
        "swap": beats(match(t["cells"], t["swapped"])),
        "mirror": beats(match(t["mirror"], t["caption"])),
        "object": beats(match(t["cells"], t["changed"])),
    }


NEGATIVES = {
    "swap": ("swapped",),
    "itm": ("swapped", "mirror"),
    "object": ("changed",),
    "all": ("swapped", "mirror", "changed"),
}


def itm_batch(t: dict[str, Tensor], negatives: str) -> tuple[Tensor, Tensor, Tensor]:
    """Positives, then each kind of negative: cells [B * (1 + n), N], ids, labels."""
    cells, ids = [t["cells"]], [t["caption"]]
    for kind in NEGATIVES[negatives]:
        cells.append(t["mirror"] if kind == "mirror" else t["cells"])
        ids.append(t["caption"] if kind == "mirror" else t[kind])
    B = len(t["cells"])
    labels = torch.cat([torch.ones(B), torch.zeros(B * (len(cells) - 1))]).long()
    return torch.cat(cells), torch.cat(ids), labels


def train(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    model = Toy(args)
    embeddings = {id(p) for m in model.fusion.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in embeddings], "lr": args.lr},
        {"params": [p for p in params if id(p) in embeddings], "lr": args.lr * args.embed_lr_scale},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=0.02)
    gen = torch.Generator().manual_seed(args.seed)
    test_scenes = draw_scenes(1000, torch.Generator().manual_seed(12345), args.objects, args.horizontal, args.third)
    test = tensors(test_scenes, args.objects)
    held_out = frozenset(test_scenes)
    curve, losses, start = [], [], time.time()

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            loss = sum(losses) / len(losses) if losses else None  # None: the start, before any step
            row = {"step": step, "loss": loss, "seconds": round(time.time() - start, 1)}
            row |= twin_accuracy(lambda c, i: model.itm(c, i).log_softmax(-1)[:, 1], test)
            if not args.single_stream:
                look = model.look(test["cells"], test["caption"])
                other = model.look(test["cells"], test["caption"], onto=3)
                row |= {
                    "look_mean": look.mean().item(),
                    "look_best": look.max().item(),
                    "look_other": other.mean().item(),
                }
            if args.third:
                logits = model.name_first(test["cells"], test["caption"])
                pick = torch.stack(
                    [test["caption"][:, 1] - OBJECT0, torch.tensor([s.third[0] for s in test_scenes])], 1
                )
                pair = logits.gather(1, pick)
                row["mlm_pair"] = (pair[:, 0] > pair[:, 1]).float().mean().item()  # a tie is a miss
        model.train()
        curve.append(row)
        losses.clear()
        print(json.dumps(row), flush=True)

    evaluate(0)
    for step in range(1, args.steps + 1):
        t = tensors(draw_scenes(args.batch, gen, args.objects, args.horizontal, args.third, held_out), args.objects)
        cells, ids, labels = itm_batch(t, args.negatives)
        loss = F.cross_entropy(model.itm(cells, ids), labels)
        if args.mlm:
            loss = loss + args.mlm * F.cross_entropy(
                model.name_first(t["cells"], t["caption"]), t["caption"][:, 1] - OBJECT0
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="JSON file for the settings and the curve")
    p.add_argument("--negatives", choices=sorted(NEGATIVES), default="itm")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32, help="positives a step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW, constant, weight decay 0.02")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--fusion-layers", type=int, default=2)
    p.add_argument("--objects", type=int, default=14, help="object kinds (the main job's scenes: 14 emoji)")
    p.add_argument("--horizontal", action="store_true", help="left and right only")
    p.add_argument("--third", action="store_true", help="a third object, of which the relation is not true")
    p.add_argument("--mlm", type=float, default=0.0, help="weight of MLM on the first object's name")
    p.add_argument("--vit-layers", type=int, default=0, help="trainable ViT blocks on the tokens before the fusion")
    p.add_argument("--single-stream", action="store_true")
    p.add_argument("--pre-ln", action="store_true", help="with --single-stream: LayerNorm before each block")
    p.add_argument(
        "--bound-init",
        type=float,
        default=0.0,
        metavar="S",
        help="start the first cross-attention looking at each named object (queries and keys S x identity)",
    )
    p.add_argument(
        "--bind",
        choices=("both", "words", "attention"),
        default="both",
        help="with --bound-init: set both halves of the look, or only the names' embeddings or only queries and keys",
    )
    p.add_argument(
        "--init",
        choices=("bert", "default", "normal"),
        default="bert",
        help="the fusion's (or single stream's) start: BERT's N(0, 0.02), PyTorch's default for each layer, "
        "or N(0, --init-std) with zero biases",
    )
    p.add_argument(
        "--init-std",
        type=float,
        default=None,
        metavar="S",
        help="with --init normal: the spread of the weights (default 0.05; BERT's is 0.02)",
    )
    p.add_argument(
        "--init-part",
        choices=("all", "cross"),
        default="all",
        help="what --init restarts: every fusion layer, or only the fusion layers' cross-attention",
    )
    p.add_argument(
        "--embed-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply the fusion's embedding tables by F after the start (LayerNorm follows them: the same "
        "start, other steps under AdamW)",
    )
    p.add_argument(
        "--embed-lr-scale",
        type=float,
        default=1.0,
        metavar="S",
        help="the fusion's embedding tables learn at S x --lr",
    )
    p.add_argument("--zero-biases", action="store_true", help="the fusion's linear biases start at zero, any --init")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.objects < 3 + args.third:
        p.error("--objects must leave a kind absent from every scene (3, or 4 with --third)")
    if args.pre_ln and not args.single_stream:
        p.error("--pre-ln sets the single stream's layers: add --single-stream")
    if args.fusion_layers < 1 or args.text_layers < 0 or args.vit_layers < 0:
        p.error("--fusion-layers must be at least 1, --text-layers and --vit-layers at least 0")
    if args.eval_every < 1 or args.steps < 1:
        p.error("--steps and --eval-every must be at least 1")
    if args.bound_init and args.single_stream:
        p.error("--bound-init sets albef's cross-attention; --single-stream has none")
    if args.bind != "both" and not args.bound_init:
        p.error("--bind chooses what --bound-init sets: add --bound-init S")
    if args.init_part == "cross" and args.init == "bert":
        p.error("--init-part cross chooses what --init restarts: add --init default|normal")
    if args.init_part == "cross" and args.single_stream:
        p.error("--init-part cross restarts albef's cross-attention; --single-stream has none")
    if args.init_std is not None and args.init != "normal":
        p.error("--init-std sets the spread of --init normal: add --init normal")
    if args.init_std is None:
        args.init_std = 0.05
    if args.init_std <= 0:
        p.error("--init-std must be positive")
    if args.embed_scale <= 0 or args.embed_lr_scale < 0:
        p.error("--embed-scale must be positive and --embed-lr-scale at least 0")
    if args.embed_scale != 1 and (args.bound_init or args.single_stream):
        p.error(
            "--embed-scale keeps the start through albef's embedding LayerNorm: not with --bound-init or "
            "--single-stream"
        )
    if args.mlm and not args.third:
        p.error("--mlm names the first object among two candidates: it needs --third")
    torch.set_num_threads(args.threads)
    curve = train(args)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "curve": curve}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
