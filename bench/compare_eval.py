"""bench/compare.py's evaluation benchmarks: retrieval (embedding a gallery, ITC, ITM re-ranking)
and VQA answer ranking, ours against LAVIS's, same weights or same inputs."""

from __future__ import annotations

import contextlib
import io
import random
import statistics

import reference as R
import torch
from harness import WORDS, alternate, captions, config, ref_amp  # bench/ on sys.path: compare.py imports this


# -- retrieval evaluation -----------------------------------------------------------------------
def scored_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest score difference over the pairs both sides re-ranked (-100 marks the rest; in bf16
    the shortlists can differ by near-ties)."""
    both = (a > -100) & (b > -100)
    return (a - b)[both].abs().max().item() if both.any() else float("nan")


def bench_retrieval(args, dev, amp: torch.dtype | None = None) -> dict:
    from albef.checkpoints.convert import from_authors
    from albef.checkpoints.loading import load_albef
    from albef.evaluation.retrieval import embed_gallery, rerank
    from albef.models.albef import ALBEF
    from albef.text import Tokenizer

    cfg = config(args.preset, args.res)
    L = R.import_lavis()
    torch.manual_seed(0)
    theirs = R.build_retrieval(L, cfg).to(dev).eval()
    ours = ALBEF(cfg, mlm_head=False).to(dev).eval()
    sd = {k: v for k, v in theirs.state_dict().items() if not k.endswith("_m") and "_m." not in k and "queue" not in k}
    sd = {
        ("text_encoder.bert." + k[len("text_encoder.") :] if k.startswith("text_encoder.") else k): v
        for k, v in sd.items()
    }
    load_albef(ours, from_authors(sd), source="LAVIS retrieval model")
    n_img, k = args.gallery, args.k
    images = torch.randn(n_img, 3, args.res, args.res, device=dev)
    texts = captions(5 * n_img, seed=2)
    tok = Tokenizer(add_sep=True)  # LAVIS's layout, [CLS] ... [SEP]
    out = {}

    def run_ours():
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            g = embed_gallery(ours, images, texts, tok, max_length=35, batch_size=64, device=dev)
            out["ours"] = rerank(ours, g, k, add_cosine=True)[1:]

    # LAVIS evaluates retrieval in float32 only: under autocast its compute_sim_matrix stops on
    # writing bf16 scores into its float32 matrix
    r_amp = None

    def run_theirs():
        with torch.no_grad():
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                out["theirs"] = L.compute_sim_matrix(theirs, R.GalleryLoader(images, texts), k_test=k)

    a, b = alternate(run_ours, run_theirs, dev, args.reps_eval, warmup=0)
    i2t_a, t2i_a = (x.float().cpu() for x in out["ours"])
    i2t_b, t2i_b = (torch.as_tensor(x) for x in out["theirs"])
    agree = torch.cat([i2t_a.argmax(1) == i2t_b.argmax(1), t2i_a.argmax(1) == t2i_b.argmax(1)]).float().mean()
    pairs = k * (n_img + len(texts))
    return {
        "what": "retrieval",
        "preset": args.preset,
        "res": args.res,
        "images": n_img,
        "texts": len(texts),
        "k": k,
        "ours_s": statistics.median(a),
        "theirs_s": statistics.median(b),
        "pairs": pairs,
        "max_abs_score_diff": max(
            (d for d in (scored_diff(i2t_a, i2t_b), scored_diff(t2i_a, t2i_b)) if d == d), default=float("nan")
        ),  # NaN: no pair in common
        "top1_agreement": agree.item(),
        "ours_dtype": str(amp or torch.float32).removeprefix("torch."),
        "theirs_dtype": str(r_amp or torch.float32).removeprefix("torch."),
    }


# -- VQA answer ranking --------------------------------------------------------------------------
def bench_vqa(args, dev, amp: torch.dtype | None = None) -> dict:
    from albef.models.tasks import ALBEFForVQA, rank_answers
    from albef.text import Tokenizer

    cfg = config(args.preset, args.res)
    L = R.import_lavis()
    torch.manual_seed(0)
    dec_layers = max(1, cfg.text.num_layers // 2)
    ours = ALBEFForVQA(cfg, decoder_layers=dec_layers).to(dev).eval()
    theirs = R.build_vqa(L, cfg, dec_layers).to(dev).eval()
    rng = random.Random(3)
    answers = sorted({" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(args.answers * 2)})
    answers = answers[: args.answers]
    questions = [q + "?" for q in captions(args.questions, seed=4, max_words=20)]
    images = torch.randn(args.questions, 3, args.res, args.res, device=dev)
    tok = Tokenizer(add_sep=True)  # LAVIS's layout, [CLS] ... [SEP]
    q = tok(questions, max_length=35, padding="longest")
    ans = tok(answers, max_length=10, padding="longest")
    k = min(args.vqa_k, len(answers))

    def run_ours():
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            states = ours.encode_question(images, q.input_ids.to(dev), q.attention_mask.to(dev))
            rank_answers(ours, states, q.attention_mask.to(dev), ans.input_ids.to(dev), ans.attention_mask.to(dev), k=k)

    r_amp = ref_amp(args, dev)

    def run_theirs():
        with torch.no_grad(), torch.autocast(dev.type, dtype=r_amp or torch.float32, enabled=r_amp is not None):
            theirs.predict_answers(
                {"image": images, "text_input": questions},
                answer_list=answers,
                num_ans_candidates=k,
                inference_method="rank",
            )

    a, b = alternate(run_ours, run_theirs, dev, args.reps_eval)
    return {
        "what": "vqa",
        "preset": args.preset,
        "res": args.res,
        "questions": args.questions,
        "answers": len(answers),
        "k": k,
        "ours_s": statistics.median(a),
        "theirs_s": statistics.median(b),
        "ours_dtype": str(amp or torch.float32).removeprefix("torch."),
        "theirs_dtype": str(r_amp or torch.float32).removeprefix("torch."),
    }
