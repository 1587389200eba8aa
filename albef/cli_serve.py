"""``albef serve``: index an image folder and serve the search / match / ask / Grad-CAM page.

Defaults are what the main job (``albef main``) trained and prepared, so after ``bash
scripts/run.sh`` a plain ``albef serve`` works; open http://127.0.0.1:8000.

Example:
    albef serve --model runs/main/retrieval/checkpoint_last.pt --images data/emoji/images/google
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

DEFAULTS = {"model": "runs/main/retrieval/checkpoint_last.pt", "images": "data/emoji/images",
            "vqa_model": "runs/main/vqa/checkpoint_last.pt", "answers": "data/easyvqa/answer_list.json"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="albef serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULTS["model"], help="albef model folder or training checkpoint")
    p.add_argument("--images", default=DEFAULTS["images"], help="folder of images to search (recursive)")
    p.add_argument("--vqa-model", default=None,
                   help=f"VQA model folder or checkpoint (default: {DEFAULTS['vqa_model']} when it exists)")
    p.add_argument("--answers", default=None, help=f"JSON answer list for VQA (default: {DEFAULTS['answers']})")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "albef" / "index"),
                   help="where image embeddings are cached (re-used while folder and model are unchanged)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _model_id(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return str(path.resolve()) + "".join(f"|{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())


def build_app(args: argparse.Namespace):
    """The FastAPI app for parsed arguments (tests call this without starting a server)."""
    from albef.api import Pipeline, Processor, VQAPipeline
    from albef.cli_evaluate import load_inference_model
    from albef.data.vqa import read_answer_list
    from albef.models.albef import ALBEF
    from albef.serve.app import create_app
    from albef.serve.index import GalleryIndex

    model_path = Path(args.model)
    if not model_path.exists():
        hint = ("run the main job first (bash scripts/run.sh) or pass --model"
                if args.model == DEFAULTS["model"] else "check the path")
        raise SystemExit(f"albef serve: no model at {model_path}: {hint}")
    model = load_inference_model(model_path)
    if not isinstance(model, ALBEF):
        raise SystemExit(f"albef serve: {model_path} holds a {type(model).__name__}; --model needs a retrieval/"
                         "pretraining model (ALBEF); give a VQA model with --vqa-model")
    pipe = Pipeline(model, Processor.for_model(model, model_path if model_path.is_dir() else None), args.device)
    index = GalleryIndex.build(pipe, args.images, args.cache_dir, model_id=_model_id(model_path),
                               progress=not args.no_progress)
    vqa = None
    vqa_path = Path(args.vqa_model or DEFAULTS["vqa_model"])
    if args.vqa_model or vqa_path.exists():
        if not vqa_path.exists():
            raise SystemExit(f"albef serve: no VQA model at {vqa_path}")
        answers = Path(args.answers or DEFAULTS["answers"])
        if not answers.exists():
            raise SystemExit(f"albef serve: VQA needs an answer list; {answers} does not exist (pass --answers FILE)")
        vqa = VQAPipeline(load_inference_model(vqa_path), device=args.device, answer_list=read_answer_list(answers),
                          k=min(128, len(read_answer_list(answers))))
    return create_app(pipe, index, vqa, model_name=str(model_path))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    app = build_app(args)
    print(f"albef serve: open http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
