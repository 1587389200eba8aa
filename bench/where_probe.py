"""Where things are, read from a scene checkpoint: do the image tokens know where they lie and what
they show, and does the fusion know where a named object is.

    .venv/bin/python bench/where_probe.py runs/main/pretrain/checkpoint_last.pt --data data

Measured on the held-out scenes' grounding records (each object's name and box,
``data/scenes/grounding_test.json``) with linear probes: ridge regression fitted on the images of
even index and scored on those of odd index, then the other way round (two folds, mean). An R² of
0 is a probe that predicts no better than the mean; below 0, worse.

1. **Image tokens** (the ViT's output, what the cross-attention reads): R² of each patch's row and
   column from its token; the norm of the position embedding against the patch embedding's (what
   share of the input is "where"); the emoji whose box covers a patch (patches under exactly one
   name, scenes of two names) from the patch's token, against the same probe on the image's mean
   token (a token that says only what the image holds scores as the mean does); the mean cosine of
   a patch token to its image's mean token.
2. **Fusion**: the name of one object alone as the text ("cow"), fused with its scene, for each
   fusion layer: R² of the object's centre from the name's state (its tokens' mean), the text-only
   state (before the first fusion layer) as the baseline; and each cross-attention head's
   attention from the name over the patches turned into a position (the attention-weighted mean of
   the patch centres), its R² against the object's centre with nothing fitted (the mean of x's and
   y's): 1 for a head that looks only at the object, 0 for one that looks everywhere; and how
   peaked the heads' attention is (their largest weight, against 1 / (1 + N) for a uniform look)
   and how much of it the image's [CLS] token takes; and each head's weight on the named object's
   patches against its weight on another object's (the mean over the scene's other objects):
   a head that looks at objects in general puts as much on either, one that looks at the named
   object more on it (``object_share``: what a uniform look puts on one object).

A relation ("A left of B") needs both: image tokens that say where and what, and a fusion that
carries the named objects' places into the text. Writes ``--out`` (default: ``where_probe.json``
beside the checkpoint) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor


def _folds(groups: Tensor):
    for f in (0, 1):
        yield groups % 2 != f, groups % 2 == f


def _ridge(X: Tensor, Y: Tensor, train: Tensor, lam: float) -> Tensor:
    """Predictions for the rows not in ``train`` of a ridge fit on standardised ``X``."""
    mu, sd = X[train].mean(0), X[train].std(0) + 1e-6
    xt, xe = (X[train] - mu) / sd, (X[~train] - mu) / sd
    ym = Y[train].mean(0)
    w = torch.linalg.solve(xt.T @ xt + lam * torch.eye(X.shape[1], dtype=X.dtype), xt.T @ (Y[train] - ym))
    return xe @ w + ym


def ridge_r2(X: Tensor, Y: Tensor, groups: Tensor, lam: float = 100.0) -> list[float]:
    """Held-out R² of each column of ``Y`` [n, t] from ``X`` [n, d], two folds by ``groups`` parity.

    >>> g = torch.arange(200) // 4
    >>> x = torch.randn(200, 8, dtype=torch.float64)
    >>> round(ridge_r2(x, x[:, :1] * 3 + 1, g, lam=1e-3)[0], 3)
    1.0
    """
    X, Y = X.double(), Y.double()
    r2 = []
    for train, test in _folds(groups):
        pred, y = _ridge(X, Y, train, lam), Y[test]
        r2.append(1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    return torch.stack(r2).mean(0).tolist()


def ridge_accuracy(X: Tensor, labels: Tensor, groups: Tensor, lam: float = 10.0) -> float:
    """Held-out accuracy of a one-vs-rest ridge classifier, two folds by ``groups`` parity."""
    X = X.double()
    onehot = torch.nn.functional.one_hot(labels, int(labels.max()) + 1).double()
    acc = [(_ridge(X, onehot, train, lam).argmax(1) == labels[test]).double().mean() for train, test in _folds(groups)]
    return float(torch.stack(acc).mean())


def explained_r2(pred: Tensor, target: Tensor) -> list[float]:
    """R² of ``pred`` against ``target`` [n, t] with nothing fitted (can be below 0)."""
    pred, target = pred.double(), target.double()
    return (1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)).tolist()


def _centre(box) -> list[float]:
    x, y, w, h = box
    return [x + w / 2, y + h / 2]


def encode_images(model, images: Tensor) -> Tensor:
    """The ViT's output for ``images`` [B, 3, H, W], 50 at a time: [B, 1 + N, D]."""
    with torch.no_grad():
        return torch.cat([model.encode_image(images[i : i + 50]) for i in range(0, len(images), 50)])


def image_token_probe(model, images: Tensor, embeds: Tensor, recs_by_image: list[list[dict]]) -> dict:
    """Section 1 on ``images`` [B, 3, H, W] (their ViT output ``embeds``) with each image's grounding records."""
    vit, vc = model.visual_encoder, model.config.vision
    grid, ps = vc.image_size // vc.patch_size, vc.patch_size
    with torch.no_grad():
        patch_norm = vit.patch_embed(images[:50]).norm(dim=-1).mean().item()
    tokens = embeds[:, 1:]  # the patches
    n = len(images)
    rowcol = torch.tensor([[r, c] for r in range(grid) for c in range(grid)], dtype=torch.float64).repeat(n, 1)
    img_of_patch = torch.arange(n).repeat_interleave(grid * grid)
    names = sorted({r["text"] for recs in recs_by_image for r in recs})
    local, mean_tok, label, group = [], [], [], []
    for b, recs in enumerate(recs_by_image):
        if len({r["text"] for r in recs}) != 2:
            continue
        for p in range(grid * grid):
            cx, cy = (p % grid) * ps + ps / 2, (p // grid) * ps + ps / 2
            hit = {r["text"] for r in recs if _inside(cx, cy, r["box"])}
            if len(hit) == 1:
                local.append(tokens[b, p])
                mean_tok.append(tokens[b].mean(0))
                label.append(names.index(hit.pop()))
                group.append(b)
    labels, groups = torch.tensor(label), torch.tensor(group)
    return {
        "position_r2_row_col": ridge_r2(tokens.reshape(-1, tokens.shape[-1]), rowcol, img_of_patch),
        "pos_embed_norm": vit.pos_embed[0, 1:].norm(dim=-1).mean().item(),
        "patch_embed_norm": patch_norm,
        "what_patches": len(labels),
        "what_from_patch_token": ridge_accuracy(torch.stack(local), labels, groups),
        "what_from_image_mean": ridge_accuracy(torch.stack(mean_tok), labels, groups),
        "cosine_to_image_mean": torch.nn.functional.cosine_similarity(tokens, tokens.mean(1, keepdim=True), dim=-1)
        .mean()
        .item(),
    }


def _inside(x: float, y: float, box) -> bool:
    return box[0] <= x < box[0] + box[2] and box[1] <= y < box[1] + box[3]


def object_masks(records: list[dict], grid: int, patch: int) -> tuple[Tensor, Tensor]:
    """Over the image's tokens ([CLS], then the patches by rows), each record's named object (the
    patches whose centre lies in its box) and the scene's other objects (each of their patches
    weighted 1 / their number, so that a look spread evenly over objects puts as much on "other" as
    on "named"; NaN for a scene with no other object; a patch under two boxes counts for both, so
    overlaps raise "named" and "other" alike): two [n, 1 + grid²] tensors.

    >>> named, other = object_masks([{"box": [0, 0, 8, 8], "candidates": [[0, 0, 8, 8], [8, 8, 8, 8]]}], 2, 8)
    >>> named.tolist(), other.tolist()
    ([[0.0, 1.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0, 1.0]])
    """
    centres = [(c * patch + patch / 2, r * patch + patch / 2) for r in range(grid) for c in range(grid)]
    named, other = [], []
    for r in records:
        boxes = [b for b in r["candidates"] if b != r["box"]]
        named.append([0.0] + [float(_inside(x, y, r["box"])) for x, y in centres])
        if not boxes:
            other.append([float("nan")] * (1 + len(centres)))
            continue
        other.append([0.0] + [sum(_inside(x, y, b) for b in boxes) / len(boxes) for x, y in centres])
    return torch.tensor(named, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)


def fusion_probe(model, embeds: Tensor, records: list[dict], image_index: list[int], tokenizer) -> dict:
    """Section 2: one record = one name fused with its image (ViT output ``embeds[image_index[i]]``)."""
    enc, vc = model.text_encoder, model.config.vision
    grid, ps = vc.image_size // vc.patch_size, vc.patch_size
    patch_centres = torch.tensor(
        [[c * ps + ps / 2, r * ps + ps / 2] for r in range(grid) for c in range(grid)], dtype=torch.float64
    )
    target = torch.tensor([_centre(r["box"]) for r in records], dtype=torch.float64)
    groups = torch.tensor(image_index)
    layers = enc.fusion_layers
    states: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]
    looks: list[list[Tensor]] = [[] for _ in layers]  # [n, heads, 2] per layer
    peaks: list[list[Tensor]] = [[] for _ in layers]  # [n, heads]: the largest attention weight
    on_cls: list[list[Tensor]] = [[] for _ in layers]  # [n, heads]: the weight on the image's [CLS]
    on_named: list[list[Tensor]] = [[] for _ in layers]  # [n, heads]: on the named object's patches
    on_other: list[list[Tensor]] = [[] for _ in layers]  # [n, heads]: on another object's, on average
    named, other = object_masks(records, grid, ps)
    for layer in layers:
        layer.crossattention.self.save_attention = True
    outs: list[Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: outs.append(out)) for layer in layers]
    try:
        with torch.no_grad():
            for i in range(0, len(records), 64):
                t = tokenizer([r["text"] for r in records[i : i + 64]], max_length=30)
                img = embeds[torch.tensor(image_index[i : i + 64])]
                words = t.attention_mask.double().clone()
                words[:, 0] = 0  # the name's tokens, not [CLS]
                words = words / words.sum(1, keepdim=True)
                outs.clear()
                text = model.encode_text(t.input_ids, t.attention_mask)
                model.fuse(text, t.attention_mask, img)
                for k, h in enumerate([text, *outs]):
                    states[k].append((h.double() * words.unsqueeze(-1)).sum(1))
                for k, layer in enumerate(layers):
                    att = layer.crossattention.self.attention_map.double()  # [B, h, L, 1 + N]
                    peaks[k].append((att.amax(-1) * words[:, None, :]).sum(-1))
                    on_cls[k].append((att[..., 0] * words[:, None, :]).sum(-1))
                    for acc, mask in ((on_named[k], named), (on_other[k], other)):
                        acc.append(((att * mask[i : i + 64, None, None]).sum(-1) * words[:, None, :]).sum(-1))
                    a = (att * words[:, None, :, None]).sum(2)[..., 1:]  # [B, h, N]: the patches
                    looks[k].append((a / a.sum(-1, keepdim=True)) @ patch_centres)
    finally:
        for h in hooks:
            h.remove()
        for layer in layers:
            layer.crossattention.self.save_attention = False
            layer.crossattention.self.attention_map = None
    first = model.config.text.fusion_layer
    out = {"text_only": {"layer": first - 1, "centre_r2_xy": ridge_r2(torch.cat(states[0]), target, groups)}}
    for k in range(len(layers)):
        look = torch.cat(looks[k])  # [n, heads, 2]
        heads = [sum(explained_r2(look[:, h], target)) / 2 for h in range(look.shape[1])]
        out[f"fusion_{k + 1}"] = {
            "layer": first + k,
            "centre_r2_xy": ridge_r2(torch.cat(states[k + 1]), target, groups),
            "best_head_attention_r2": max(heads),
            "mean_head_attention_r2": sum(heads) / len(heads),
            "mean_peak_weight": torch.cat(peaks[k]).mean().item(),  # 1 / (1 + N) for a uniform look
            "mean_weight_on_image_cls": torch.cat(on_cls[k]).mean().item(),
            "weight_on_named_object_per_head": torch.cat(on_named[k]).mean(0).tolist(),
            "weight_on_other_object_per_head": torch.cat(on_other[k]).nanmean(0).tolist(),  # scenes of two or more
        }
    return out


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from albef.checkpoints.pretrained import load_inference_model
    from albef.data.transforms import test_transform
    from albef.models.fast import make_plain
    from albef.text import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a scene pretraining checkpoint (or any albef model path)")
    p.add_argument("--data", type=Path, default=Path("data"), help="the main job's data folder")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    model = make_plain(load_inference_model(args.checkpoint).eval())  # the plain model: its attention maps
    root = args.data / "scenes"
    records = json.loads((root / "grounding_test.json").read_text())
    paths = sorted({r["image"] for r in records})
    tf = test_transform(model.config.vision.image_size)
    images = torch.stack([tf(Image.open(root / f).convert("RGB")) for f in paths])
    index = {f: i for i, f in enumerate(paths)}
    by_image: list[list[dict]] = [[] for _ in paths]
    for r in records:
        by_image[index[r["image"]]].append(r)
    embeds = encode_images(model, images)
    res = {
        "images": len(paths),
        "records": len(records),
        "image_tokens": image_token_probe(model, images, embeds, by_image),
        "fusion": fusion_probe(model, embeds, records, [index[r["image"]] for r in records], Tokenizer()),
    }
    vc = model.config.vision
    named, _ = object_masks(records, vc.image_size // vc.patch_size, vc.patch_size)
    res["object_share"] = named.sum(1).mean().item() / named.shape[1]  # a uniform look's weight on one object
    out = args.out or (args.checkpoint.parent if args.checkpoint.is_file() else args.checkpoint) / "where_probe.json"
    out.write_text(json.dumps(res, indent=1))
    it = res["image_tokens"]
    print(
        f"image tokens: position R² row {it['position_r2_row_col'][0]:.2f} col {it['position_r2_row_col'][1]:.2f}; "
        f"position embedding norm {it['pos_embed_norm']:.2f} against patch embedding {it['patch_embed_norm']:.2f}; "
        f"the emoji under a patch from its token {100 * it['what_from_patch_token']:.1f} %, from the image's mean "
        f"token {100 * it['what_from_image_mean']:.1f} % ({it['what_patches']} patches); cosine to the image mean "
        f"{it['cosine_to_image_mean']:.2f}"
    )
    for name, f in res["fusion"].items():
        line = f"{name} (text layer {f['layer']}): centre R² x {f['centre_r2_xy'][0]:.2f} y {f['centre_r2_xy'][1]:.2f}"
        if "best_head_attention_r2" in f:
            on_named = f["weight_on_named_object_per_head"]
            best = max(range(len(on_named)), key=on_named.__getitem__)
            line += (
                f"; attention as a position, R² best head {f['best_head_attention_r2']:.2f}, mean "
                f"{f['mean_head_attention_r2']:.2f}; peak weight {f['mean_peak_weight']:.3f}, on the image "
                f"[CLS] {f['mean_weight_on_image_cls']:.3f}; the head that looks most at the named object: "
                f"{on_named[best]:.3f} on it, {f['weight_on_other_object_per_head'][best]:.3f} on another object"
            )
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
