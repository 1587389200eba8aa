"""Two-stage image–text retrieval evaluation, exactly as the authors score it, faster.

Stage 1: cosine similarities of every image with every text (no temperature). Stage 2: for each
image its top-``k`` texts, and for each text its top-``k`` images, are re-scored by the fusion
encoder and the ITM head's positive logit; every other entry is −100. The metrics are the
authors' ``itm_eval``: the rank of an image's best-ranked caption (TR), of a text's image (IR).

Speed: the reference runs one fusion pass per query (k pairs), and so projects the image's
cross-attention keys/values again for every text query it appears in. Here the pairs of both
directions are pooled (a pair needed by both is scored once), grouped by image, and scored in
large batches with each image's keys/values projected once per batch; ranks share the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from albef.data.retrieval import ImageListDataset, RetrievalEvalSet
from albef.distributed import all_reduce_sum, rank_slice
from albef.models.albef import ALBEF
from albef.models.fusion import FusionRows
from albef.text import Tokenizer


@dataclass
class GalleryEmbeddings:
    image_embeds: Tensor  # [N_img, 1+P, Dv] ViT sequences (kept for ITM)
    image_feat: Tensor  # [N_img, E] normalised
    text_embeds: Tensor  # [N_txt, L, H] text-layer outputs
    text_mask: Tensor  # [N_txt, L]
    text_feat: Tensor  # [N_txt, E]


@torch.no_grad()
def embed_gallery(
    model: ALBEF,
    images: Sequence[str] | Tensor,
    texts: Sequence[str],
    tokenizer: Tokenizer,
    transform=None,
    max_length: int = 30,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> GalleryEmbeddings:
    """Embed every image (paths through ``transform``, or a tensor of pixels) and every text."""
    model.eval()
    if isinstance(images, Tensor):
        batches = images.split(batch_size)
    else:
        batches = DataLoader(ImageListDataset(images, transform), batch_size=batch_size, num_workers=num_workers)
    image_embeds = torch.cat([model.encode_image(b.to(device)) for b in batches])
    tok = tokenizer(list(texts), max_length=max_length, padding="longest")
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    text_embeds = torch.cat(
        [model.encode_text(ids[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(ids), batch_size)]
    )
    return GalleryEmbeddings(
        image_embeds, model.image_feat(image_embeds), text_embeds, mask, model.text_feat(text_embeds, mask)
    )


@torch.no_grad()
def itm_pair_scores(model: ALBEF, g: GalleryEmbeddings, img: Tensor, txt: Tensor, batch_size: int = 256) -> Tensor:
    """ITM positive logit of each (img[p], txt[p]) pair.

    Pairs are batched in order of text length (then image), and each batch is cut to its own
    longest text: the fusion cost is per token, and a gallery padded to its longest caption
    would spend most of it on padding. Image keys/values are projected once per image of a batch.
    """
    lengths = g.text_mask.sum(1)[txt]
    order = torch.argsort(img, stable=True)
    order = order[torch.argsort(lengths[order], stable=True)]  # by length, ties by image
    out = torch.empty(len(img), dtype=g.text_embeds.dtype, device=g.text_embeds.device)
    for s in range(0, len(order), batch_size):
        sel = order[s : s + batch_size]
        images, inverse = torch.unique(img[sel], return_inverse=True)
        t = txt[sel]
        L = int(lengths[sel].max())
        pairs = FusionRows()  # a fast model projects the keys/values once per image of the batch
        pairs.add("pairs", g.text_embeds[t, :L], g.text_mask[t, :L], images=inverse)
        cls = model.fuse_rows(pairs, g.image_embeds[images])["pairs"]  # [n, H]
        out[sel] = model.itm_head(cls)[:, 1].to(out.dtype)  # autocast gives bf16 logits
    return out


def cosines(g: GalleryEmbeddings) -> Tensor:
    """ITC cosines of every image with every text, [N_img, N_txt], at least float32, also under autocast:
    in bfloat16 near-equal scores would tie and shuffle the shortlists and the re-ranked order."""
    up = lambda x: x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # noqa: E731 (float64 stays)
    with torch.autocast(g.image_feat.device.type, enabled=False):
        return up(g.image_feat) @ up(g.text_feat).T


@torch.no_grad()
def rerank(
    model: ALBEF, g: GalleryEmbeddings, k: int, batch_size: int = 256, add_cosine: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Score matrices ``(sims, score_i2t [N_img, N_txt], score_t2i [N_txt, N_img])``.

    ``add_cosine=True`` is LAVIS's score (ITM logit + cosine); the authors' is the logit alone.
    Split across ranks when a process group is initialised.
    """
    sims = cosines(g)  # [N_img, N_txt]
    n_img, n_txt = sims.shape
    k_t, k_i = min(k, n_txt), min(k, n_img)
    top_t = sims.topk(k_t, dim=1).indices  # texts of each image
    top_i = sims.T.topk(k_i, dim=1).indices  # images of each text
    rows_img = torch.arange(n_img, device=sims.device).repeat_interleave(k_t)
    rows_txt = torch.arange(n_txt, device=sims.device).repeat_interleave(k_i)
    pairs = torch.cat([torch.stack([rows_img, top_t.reshape(-1)]), torch.stack([top_i.reshape(-1), rows_txt])], 1)
    codes = torch.unique(pairs[0] * n_txt + pairs[1])  # each (image, text) pair once
    share = rank_slice(len(codes))  # this rank's pairs; the others' stay 0 until the sum
    mine = codes[share]
    scores = torch.zeros(len(codes), dtype=sims.dtype, device=sims.device)
    if len(mine):
        scores[share] = itm_pair_scores(model, g, mine // n_txt, mine % n_txt, batch_size).to(sims.dtype)
    scores = all_reduce_sum(scores)
    if add_cosine:
        scores = scores + sims.reshape(-1)[codes]
    full = torch.full((n_img * n_txt,), -100.0, dtype=sims.dtype, device=sims.device)
    full[codes] = scores
    full = full.view(n_img, n_txt)
    i2t = torch.full_like(sims, -100.0)
    i2t.scatter_(1, top_t, full.gather(1, top_t))
    t2i = torch.full_like(sims.T, -100.0)
    t2i.scatter_(1, top_i, full.T.gather(1, top_i))
    return sims, i2t, t2i


@torch.no_grad()
def rerank_per_query(model: ALBEF, g: GalleryEmbeddings, k: int, add_cosine: bool = False) -> tuple[Tensor, Tensor]:
    """The reference's loop: one fusion pass per query over its k candidates (for tests and
    benchmarks; :func:`rerank` gives the same matrices)."""
    sims = cosines(g)
    i2t = torch.full_like(sims, -100.0)
    for i in range(sims.shape[0]):
        vals, idx = sims[i].topk(min(k, sims.shape[1]))
        fused = model.fuse(g.text_embeds[idx], g.text_mask[idx], g.image_embeds[i].expand(len(idx), -1, -1))
        i2t[i, idx] = (model.itm_logits(fused)[:, 1] + (vals if add_cosine else 0)).to(i2t.dtype)
    t2i = torch.full_like(sims.T, -100.0)
    for t in range(sims.shape[1]):
        vals, idx = sims[:, t].topk(min(k, sims.shape[0]))
        fused = model.fuse(
            g.text_embeds[t].expand(len(idx), -1, -1), g.text_mask[t].expand(len(idx), -1), g.image_embeds[idx]
        )
        t2i[t, idx] = (model.itm_logits(fused)[:, 1] + (vals if add_cosine else 0)).to(t2i.dtype)
    return i2t, t2i


def retrieval_metrics(
    score_i2t: Tensor | np.ndarray, score_t2i: Tensor | np.ndarray, img2txt: list[list[int]], txt2img: list[int]
) -> dict[str, float]:
    """The authors' ``itm_eval``: ranks by ``np.argsort(score)[::-1]`` (among tied scores the
    later index ranks higher), an image's rank = its best caption's, recalls in percent."""
    s_i2t = np.asarray(score_i2t.float().cpu() if isinstance(score_i2t, Tensor) else score_i2t)
    s_t2i = np.asarray(score_t2i.float().cpu() if isinstance(score_t2i, Tensor) else score_t2i)
    ranks = np.zeros(s_i2t.shape[0])
    for index, score in enumerate(s_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    ranks = np.zeros(s_t2i.shape[0])
    for index, score in enumerate(s_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < r) for r in (1, 5, 10)]
    tr_mean, ir_mean = sum(tr) / 3, sum(ir) / 3
    return {
        "txt_r1": tr[0],
        "txt_r5": tr[1],
        "txt_r10": tr[2],
        "txt_r_mean": tr_mean,
        "img_r1": ir[0],
        "img_r5": ir[1],
        "img_r10": ir[2],
        "img_r_mean": ir_mean,
        "r_mean": (tr_mean + ir_mean) / 2,
    }


def evaluate_retrieval(
    model: ALBEF,
    data: RetrievalEvalSet,
    tokenizer: Tokenizer,
    transform,
    k: int = 256,
    itc_only: bool = False,
    add_cosine: bool = False,
    batch_size: int = 64,
    itm_batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    max_length: int = 30,
    diagnose: bool = False,
) -> dict[str, dict[str, float]]:
    """Metrics of ITC alone and (unless ``itc_only``) of ITC + ITM re-ranking; ``diagnose`` adds
    ``"diagnostic"``, the win rates of :func:`itm_diagnostic`."""
    if not data.images or not data.texts:
        raise ValueError(
            "the retrieval evaluation set is empty: nothing to evaluate (give it entries with an image and captions)"
        )
    g = embed_gallery(model, data.images, data.texts, tokenizer, transform, max_length, batch_size, num_workers, device)
    sims = cosines(g)
    results = {"itc": retrieval_metrics(sims, sims.T, data.img2txt, data.txt2img)}
    if not itc_only:
        _, i2t, t2i = rerank(model, g, k, itm_batch_size, add_cosine)
        results["itm"] = retrieval_metrics(i2t, t2i, data.img2txt, data.txt2img)
        if diagnose:
            results["diagnostic"] = itm_diagnostic(model, g, data.img2txt, batch_size=itm_batch_size, sims=sims)
    return results


def win_rate(a: Tensor, b: Tensor) -> float:
    """Fraction of pairs with ``a[p] > b[p]``, ties counting one half.

    >>> win_rate(torch.tensor([2., 3., 1.]), torch.tensor([1., 3., 2.]))
    0.5
    """
    if not len(a):
        return float("nan")
    return float((a > b).double().mean() + 0.5 * (a == b).double().mean())


@torch.no_grad()
def itm_diagnostic(
    model: ALBEF,
    g: GalleryEmbeddings,
    img2txt: list[list[int]],
    seed: int = 0,
    batch_size: int = 256,
    sims: Tensor | None = None,
) -> dict[str, float]:
    """How often ITM and ITC each prefer an image's own caption to a wrong one, pair by pair.

    For every (image, own caption): the same image with one random caption of another image, and
    with the other images' caption that ITC ranks highest for it (the hard negative: the kind the
    re-ranking must reject). Returns the win rates of the ITM positive logit (the authors' re-ranking
    score) and of the ITC cosine against each (0.5 = chance). ITM re-ranking helps where its win rate against hard
    negatives beats ITC's; a model whose ITM wins against hard negatives but not against random
    ones has learned which captions ITC tends to confuse, not to look at the image.

    Example (``g`` from :func:`embed_gallery`)::

        d = itm_diagnostic(model, g, data.img2txt)
        d["itm_vs_hard"], d["itc_vs_hard"]
    """
    n_txt = g.text_feat.shape[0]
    gen = torch.Generator().manual_seed(seed)
    sims = (cosines(g) if sims is None else sims).cpu()  # ITC cosines [N_img, N_txt]
    img, pos, rnd, hard = [], [], [], []
    for i, caps in enumerate(img2txt):
        own = torch.zeros(n_txt, dtype=torch.bool)
        own[list(caps)] = True
        others = (~own).nonzero().squeeze(1)
        if not len(others) or not len(caps):
            continue
        img += [i] * len(caps)
        pos += list(caps)
        rnd += others[torch.randint(len(others), (len(caps),), generator=gen)].tolist()
        hard += [int(others[sims[i, others].argmax()])] * len(caps)
    out: dict[str, float] = {"pairs": len(img)}
    if not img:
        return out
    dev = g.text_feat.device
    i = torch.tensor(img, dtype=torch.long)
    # one ITM pass over the three pair sets (a pair shared by two sets is scored twice; cheap)
    t = torch.tensor(pos + rnd + hard, dtype=torch.long)
    itm = itm_pair_scores(model, g, i.repeat(3).to(dev), t.to(dev), batch_size).cpu().view(3, -1)
    itc = sims[i.repeat(3), t].view(3, -1)
    for name, row in (("random", 1), ("hard", 2)):
        out[f"itm_vs_{name}"] = win_rate(itm[0], itm[row])
        out[f"itc_vs_{name}"] = win_rate(itc[0], itc[row])
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Recall tables side by side: one row per entry of ``results`` (name -> retrieval metrics)."""
    cols = [
        ("TR@1", "txt_r1"),
        ("TR@5", "txt_r5"),
        ("TR@10", "txt_r10"),
        ("IR@1", "img_r1"),
        ("IR@5", "img_r5"),
        ("IR@10", "img_r10"),
        ("r_mean", "r_mean"),
    ]
    w = max([10, *(len(n) + 1 for n in results)])
    lines = [f"{'':{w}s}" + "".join(f"{c:>8s}" for c, _ in cols)]
    for name, m in results.items():
        lines.append(f"{name:{w}s}" + "".join(f"{m[k]:8.2f}" for _, k in cols))
    return "\n".join(lines)
