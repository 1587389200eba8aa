"""``albef evaluate retrieval|grounding|vqa|ve|nlvr``: score a model on an evaluation file.

    albef evaluate retrieval --model DIR --data coco_test.json --image-root /data/coco --k 256
    albef evaluate grounding --model DIR --data refcoco+_grounding.json --image-root /data/coco --overlays out/
                                        # (refcoco+_grounding.json: albef data refcoco)
    albef evaluate vqa --model DIR --data vqa_test.json --answers answer_list.json --results answers.json
    torchrun --nproc_per_node 8 -m albef.cli evaluate retrieval ...   # re-ranking split over ranks

Zero-shot Flickr30K as in the paper: evaluate the COCO-fine-tuned model on Flickr30K's test split
(``--model coco_finetuned --data flickr30k_test.json --k 128``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from albef.checkpoints.files import atomic_write_text
from albef.checkpoints.pretrained import load_inference_model
from albef.data.retrieval import read_retrieval_eval
from albef.data.transforms import test_transform
from albef.evaluation.grounding import OVERLAY_NAMES
from albef.evaluation.retrieval import format_table
from albef.outputs import earlier_outputs, new_output_file
from albef.precision import add_precision_option, autocast, resolve_precision
from albef.text import Tokenizer

MODEL_HELP = (
    "an albef model folder, a run's checkpoint (.pt), or a run folder: its checkpoint_best.pt "
    "(best validation epoch), else checkpoint_last.pt"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("retrieval", help="TR/IR R@1/5/10 with ITC alone and ITC + ITM re-ranking")
    r.add_argument("--model", required=True, help=MODEL_HELP)
    r.add_argument("--data", required=True, nargs="+", help='eval JSON: [{"image", "caption": [...]}]')
    r.add_argument("--image-root")
    r.add_argument("--k", type=int, default=256, help="shortlist size re-ranked by ITM (COCO 256, Flickr 128)")
    r.add_argument("--itc-only", action="store_true")
    r.add_argument("--lavis-score", action="store_true", help="re-rank score = ITM logit + cosine (LAVIS)")
    r.add_argument(
        "--max-length",
        type=int,
        default=30,
        help="tokens a caption is cut at, [CLS] (and [SEP]) included (the authors' 30; LAVIS's 35)",
    )
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--itm-batch-size", type=int, default=256)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--device", default="auto")
    r.add_argument("--out", help="write the metrics as JSON here")
    g = sub.add_parser("grounding", help="box accuracy (IoU >= 0.5) of Grad-CAM-ranked candidate boxes")
    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument(
        "--data",
        required=True,
        nargs="+",
        help='JSON: [{"image", "text", "ref_id", "box": [x,y,w,h], "candidates": [[x,y,w,h], ...]}]',
    )
    g.add_argument("--image-root")
    g.add_argument("--mode", choices=["itm", "itc"], default="itm")
    g.add_argument(
        "--layer",
        type=int,
        help="itm: text layer (default: a third of the way into the fusion layers, 8 for albef-base); itc: ViT block "
        "(default 8 of 12 as the authors; two thirds of the depth)",
    )
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--overlays", help="write heat-map overlay PNGs of some examples here")
    g.add_argument("--n-overlays", type=int, default=8)
    g.add_argument("--device", default="auto")
    g.add_argument("--out")
    v = sub.add_parser("vqa", help="answer ranking; writes [{question_id, answer}] and accuracy where answers exist")
    v.add_argument("--model", required=True, help=MODEL_HELP)
    v.add_argument("--data", required=True, nargs="+", help='JSON: [{"image", "question", "question_id"}]')
    v.add_argument("--answers", required=True, help="answer_list.json")
    v.add_argument("--image-root")
    v.add_argument("--vqa-root", help='root of "dataset": "vqa" entries\' images (COCO); default --image-root')
    v.add_argument("--vg-root", help='root of "dataset": "vg" entries\' images (Visual Genome); default --image-root')
    v.add_argument("--k", type=int, default=128)
    v.add_argument("--scoring", choices=["albef", "corrected", "lavis"], default="albef")
    v.add_argument("--results", help="write the answers here (the official server's format)")
    for name, help_ in (("ve", "SNLI-VE accuracy"), ("nlvr", "NLVR2 accuracy")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--model", required=True, help=MODEL_HELP)
        c.add_argument("--data", required=True, nargs="+")
        c.add_argument("--image-root")
    for q in (v, *[sub.choices[n] for n in ("ve", "nlvr")]):
        q.add_argument("--batch-size", type=int, default=32)
        q.add_argument("--num-workers", type=int, default=0)
        q.add_argument("--device", default="auto")
        q.add_argument("--out", help="write the metrics as JSON here")
    for q in sub.choices.values():
        add_precision_option(q)
        q.add_argument("--overwrite", action="store_true", help="replace the files --out, --results or --overlays hold")
    args = p.parse_args(argv)
    if getattr(args, "max_length", 2) < 2:  # [CLS] and one word at least
        p.error(f"--max-length {args.max_length}: must be at least 2")
    if getattr(args, "results", None) and args.out and Path(args.results).resolve() == Path(args.out).resolve():
        p.error("--out and --results name one file: the metrics would replace the answers")
    for flag in ("out", "results"):  # checked now: a bad path would otherwise lose hours of scoring at the end
        if getattr(args, flag, None):
            new_output_file(getattr(args, flag), f"--{flag}", args.overwrite)
    if getattr(args, "overlays", None):
        args.earlier_overlays = earlier_outputs(args.overlays, OVERLAY_NAMES, "--overlays", args.overwrite)
    if args.what == "grounding":
        return _grounding(args)
    if args.what in ("vqa", "ve", "nlvr"):
        return _task(args)

    from albef.distributed import init_distributed, shutdown
    from albef.evaluation.retrieval import evaluate_retrieval

    info = init_distributed(args.device)
    try:
        precision = resolve_precision(args.precision, info.device, "--precision")
        model = load_inference_model(args.model, info.device)
        data = read_retrieval_eval(args.data, args.image_root, None, model.config.text_cleaning)
        tok = Tokenizer(add_sep=model.config.add_sep)
        with autocast(info.device, precision):  # the cosines and scores stay float32 (evaluation.retrieval)
            results = evaluate_retrieval(
                model,
                data,
                tok,
                test_transform(model.config.vision.image_size),
                args.k,
                args.itc_only,
                args.lavis_score,
                args.batch_size,
                args.itm_batch_size,
                args.num_workers,
                info.device,
                max_length=args.max_length,
            )
    finally:
        shutdown()
    if info.is_main:
        print(
            f"{len(data.images)} images, {len(data.texts)} texts, k = {args.k}"
            + (f", {precision} autocast" if precision != "fp32" else "")
        )
        print(format_table({("ITC" if k == "itc" else "ITC+ITM"): v for k, v in results.items()}))
        if args.out:
            atomic_write_text(
                Path(args.out),
                json.dumps(
                    {"k": args.k, "n_images": len(data.images), "n_texts": len(data.texts), **results}, indent=2
                ),
            )
    return 0


def _grounding(args: argparse.Namespace) -> int:
    from albef.distributed import init_distributed, shutdown
    from albef.evaluation.grounding import evaluate_grounding, read_grounding, save_overlays

    info = init_distributed(args.device)  # under torchrun the expressions are split across ranks
    try:
        precision = resolve_precision(args.precision, info.device, "--precision")
        model = load_inference_model(args.model, info.device)
        records = read_grounding(args.data, args.image_root, model.config.text_cleaning)
        with autocast(info.device, precision):
            metrics, preds = evaluate_grounding(
                model,
                records,
                Tokenizer(add_sep=model.config.add_sep),
                test_transform(model.config.vision.image_size),
                args.mode,
                args.layer,
                args.batch_size,
                info.device,
            )
    finally:
        shutdown()
    if not info.is_main:
        return 0
    print(f"grounding ({args.mode} Grad-CAM) on {metrics['n']} expressions: accuracy {metrics['accuracy']:.2f}%")
    for split, acc in metrics["per_split"].items():
        print(f"  {split:10s} {acc:6.2f}%")
    if args.overlays:
        for old in args.earlier_overlays:  # asked to replace them (--overwrite): no mix of two runs' overlays
            old.unlink(missing_ok=True)
        paths = save_overlays(preds, args.overlays, args.n_overlays)
        print(f"wrote {len(paths)} overlays to {args.overlays}")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(metrics, indent=2))
    return 0


def _task(args: argparse.Namespace) -> int:
    from albef.data.annotations import require_entries
    from albef.data.classification import read_classification
    from albef.data.vqa import TEST_QUESTION_WORDS, read_answer_list, read_vqa
    from albef.distributed import init_distributed, shutdown
    from albef.evaluation.tasks import evaluate_classification, evaluate_vqa

    info = init_distributed(args.device)  # under torchrun the records are split across ranks
    try:
        precision = resolve_precision(args.precision, info.device, "--precision")
        model = load_inference_model(args.model, info.device)
        tok = Tokenizer(add_sep=model.config.add_sep)
        transform = test_transform(model.config.vision.image_size)
        amp = autocast(info.device, precision)
        if args.what == "vqa":
            records, bad = read_vqa(
                args.data,
                args.image_root,
                train=False,
                cleaning=model.config.text_cleaning,
                max_words=TEST_QUESTION_WORDS,
                vqa_root=args.vqa_root,
                vg_root=args.vg_root,
            )
            if bad:  # a dropped question would be missing from the results file
                raise ValueError("bad evaluation entries:\n  " + "\n  ".join(map(str, bad[:20])))
            with amp:
                metrics, results = evaluate_vqa(
                    model,
                    records,
                    read_answer_list(args.answers),
                    tok,
                    transform,
                    args.k,
                    args.scoring,
                    args.batch_size,
                    args.num_workers,
                    info.device,
                )
        else:
            records, bad = read_classification(args.data, args.image_root, args.what, model.config.text_cleaning)
            require_entries(len(records), args.data, f"{args.what} evaluation")
            if bad:
                raise ValueError("bad evaluation entries:\n  " + "\n  ".join(map(str, bad[:20])))
            with amp:
                metrics = evaluate_classification(
                    model, records, tok, transform, args.batch_size, args.num_workers, info.device
                )
    finally:
        shutdown()
    if not info.is_main:
        return 0
    if args.what == "vqa":
        if args.results:
            atomic_write_text(Path(args.results), json.dumps(results))
        print(
            f"VQA on {metrics['n']} questions"
            + "".join(f"\n  {k:10s} {v:6.2f}%" for k, v in metrics.items() if k != "n")
        )
    else:
        print(f"{args.what} accuracy on {metrics['n']} examples: {metrics['accuracy']:.2f}%")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
