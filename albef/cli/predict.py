"""``albef predict``: score image–text pairs, or draw where the model looks for a phrase.

albef predict score --model DIR --image a.png --image b.png --text "a red circle" --text "a dog"
albef predict gradcam --model DIR --image a.png --text "a red circle" --out overlay.png
albef predict answer --model VQA_DIR --image a.png --question "what color is it?" --answers answers.json
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

from albef.api import Pipeline
from albef.checkpoints.files import atomic_write_bytes
from albef.checkpoints.pretrained import MODEL_PATHS, NotAModelError
from albef.outputs import new_output_file
from albef.precision import add_precision_option
from albef.viz import overlay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="albef predict", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("score", help="ITC cosine and ITM probability of every image with every text")
    g = sub.add_parser("gradcam", help="Grad-CAM overlay PNG of a phrase on an image")
    for q in (s, g):
        q.add_argument("--model", required=True, help=MODEL_PATHS)
        q.add_argument("--image", action="append", required=True)
        q.add_argument("--text", action="append", required=True)
        q.add_argument("--device")
    g.add_argument("--out", required=True, help="the overlay image (PNG; another format by its suffix, e.g. .jpg)")
    g.add_argument("--overwrite", action="store_true", help="replace the image --out names if it exists")
    g.add_argument(
        "--layer",
        type=int,
        help="text layer whose cross-attention is used (default: a third of the way into the "
        "fusion layers, 8 for albef-base, 4 for albef-small)",
    )
    g.add_argument("--box", action="append", help="candidate box x,y,w,h (repeatable): the best is drawn in green")
    a = sub.add_parser("answer", help="answer a question about an image from an answer list (a VQA model)")
    a.add_argument("--model", required=True, help="a VQA model: " + MODEL_PATHS)
    a.add_argument("--image", required=True)
    a.add_argument("--question", required=True)
    a.add_argument("--answers", required=True, help="JSON list of candidate answers (answer_list.json)")
    a.add_argument("--k", type=int, default=128, help="first-token shortlist size")
    a.add_argument("--device")
    for q in (s, g, a):
        add_precision_option(q)
    args = p.parse_args(argv)
    if args.what == "gradcam":  # before the model is loaded
        new_output_file(args.out, "--out", args.overwrite)
        image_format = Image.registered_extensions().get(Path(args.out).suffix.lower(), "PNG")
        if image_format not in Image.SAVE:
            p.error(f"--out {args.out}: Pillow cannot write {image_format} files; name a .png or .jpg file")
        try:
            boxes = [tuple(float(v) for v in b.split(",")) for b in args.box or []]
        except ValueError:
            boxes = [()]
        if any(len(b) != 4 for b in boxes):
            p.error("--box takes x,y,w,h (four numbers)")
    if args.what == "answer":
        from albef.api import VQAPipeline
        from albef.data.vqa import read_answer_list

        try:
            answers = read_answer_list(args.answers)
            vqa = VQAPipeline.from_pretrained(
                args.model, device=args.device, answer_list=answers, k=args.k, precision=args.precision
            )
        except (NotAModelError, FileNotFoundError, ValueError) as e:
            raise SystemExit(f"albef predict: {e}") from None
        res = vqa.answer([args.image], [args.question])[0]
        print(res.answer)
        for ans, score in res.candidates[:5]:
            print(f"  {score:7.4f}  {ans}")
        return 0
    try:
        pipe = Pipeline.from_pretrained(args.model, device=args.device, precision=args.precision)
    except (NotAModelError, FileNotFoundError) as e:
        raise SystemExit(f"albef predict: {e}") from None
    if args.what == "score":
        sims = pipe.similarity(args.image, args.text)
        print(f"{'image':30s} {'text':40s} {'itc':>7s} {'itm':>7s}")
        for i, img in enumerate(args.image):
            probs = pipe.match([img] * len(args.text), args.text)
            for j, txt in enumerate(args.text):
                print(f"{str(img)[-30:]:30s} {txt[:40]:40s} {sims[i, j].item():7.3f} {probs[j].item():7.3f}")
        return 0
    res = pipe.ground(args.image[0], args.text[0], boxes or None, args.layer)
    drawn = overlay(pipe.processor.load(args.image[0]), res.heatmap_image, boxes=boxes, highlight=res.best_box)
    buf = io.BytesIO()
    drawn.save(buf, format=image_format)
    atomic_write_bytes(Path(args.out), buf.getvalue())
    print(f"wrote {args.out}" + (f"; best box {res.best_box}: {boxes[res.best_box]}" if boxes else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
