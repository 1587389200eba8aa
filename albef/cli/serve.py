"""``albef serve``: index an image folder and serve the search / match / ask / Grad-CAM page.

Defaults are what the main job (``albef main``) trained and prepared, so after ``bash
scripts/run.sh`` a plain ``albef serve`` works; open http://127.0.0.1:8000.

Example:
    albef serve --model runs/main/pretrain/checkpoint_last.pt --images data/emoji/images/google
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

DEFAULTS = {
    "model": "runs/main/pretrain/checkpoint_last.pt",
    "images": "data/emoji/images",
    "vqa_model": "runs/main/vqa/checkpoint_last.pt",
    "answers": "data/easyvqa/answer_list.json",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="albef serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULTS["model"], help="albef model folder or training checkpoint")
    p.add_argument("--images", default=DEFAULTS["images"], help="folder of images to search (recursive)")
    p.add_argument(
        "--vqa-model",
        default=None,
        help=f"VQA model folder or checkpoint (default: {DEFAULTS['vqa_model']} when it exists)",
    )
    p.add_argument("--answers", default=None, help=f"JSON answer list for VQA (default: {DEFAULTS['answers']})")
    p.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache" / "albef" / "index"),
        help="where image embeddings are cached (re-used while folder and model are unchanged)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        type=_host_name,
        help="a host name the server answers besides localhost, 127.0.0.1 and [::1] (any port); "
        "repeatable; needed when it is reached by another name or address (with --host 0.0.0.0); "
        "'*' answers any name (behind a proxy that checks it). Other Host headers get 421",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=None,
        metavar="N",
        help="largest upload in pixels, read from the file's header before decoding (default: "
        "16000000; the model sees at most 384 px a side, so this only has to admit 12-16 Mpx "
        "phone photos and 4K/5K screenshots)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=_positive_float,
        default=None,
        metavar="MB",
        help="largest upload file; a longer request body is refused with 413 as it arrives (default: 16)",
    )
    p.add_argument(
        "--max-decodes",
        type=_positive_int,
        default=None,
        metavar="N",
        help="images decoded at once; more uploads wait their turn (default: 2, about one per core; "
        "each holds up to 4 bytes x --max-pixels while it decodes)",
    )
    p.add_argument("--device", default=None)
    from albef.precision import add_precision_option

    add_precision_option(p)
    p.add_argument("--no-progress", action="store_true")
    return p


def _host_name(text: str) -> str:
    from albef.serve.guard import normalise_host

    try:
        return normalise_host(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a host name: {e}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _allowed_hosts(args: argparse.Namespace) -> list[str]:
    """``--allowed-host`` names, plus ``--host`` itself when it is one address rather than all."""
    extra = list(getattr(args, "allowed_host", None) or [])
    host = getattr(args, "host", "127.0.0.1")
    if host not in ("0.0.0.0", "::", ""):
        extra.append(host)
    return extra


def _model_id(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return str(path.resolve()) + "".join(
        f"|{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()
    )


def build_app(args: argparse.Namespace):
    """The FastAPI app for parsed arguments (tests call this without starting a server)."""
    from albef.api import Pipeline, Processor, VQAPipeline
    from albef.checkpoints.pretrained import NotAModelError, load_inference_model, resolve_model_path
    from albef.data.vqa import read_answer_list
    from albef.models.albef import ALBEF
    from albef.models.tasks import ALBEFForVQA
    from albef.search.gallery import GalleryIndex
    from albef.serve.app import create_app

    model_path = Path(args.model)
    if not model_path.exists():
        hint = (
            "run the main job first (bash scripts/run.sh) or pass --model"
            if args.model == DEFAULTS["model"]
            else "check the path"
        )
        raise SystemExit(f"albef serve: no model at {model_path}: {hint}")
    try:
        model = load_inference_model(model_path)
    except NotAModelError as e:
        raise SystemExit(f"albef serve: {e}") from None
    if not isinstance(model, ALBEF):
        raise SystemExit(
            f"albef serve: {model_path} holds a {type(model).__name__}; --model needs a retrieval/"
            "pretraining model (ALBEF); give a VQA model with --vqa-model"
        )
    folder = resolve_model_path(model_path)  # a run folder holds checkpoints, not tokenizer files
    precision = getattr(args, "precision", "fp32")
    pipe = Pipeline(
        model, Processor.for_model(model, folder if folder.is_dir() else None), args.device, precision=precision
    )
    index = GalleryIndex.build(
        pipe,
        args.images,
        args.cache_dir,  # embedded in the pipeline's precision
        model_id=_model_id(model_path) + (f"|{pipe.precision}" if pipe.amp else ""),
        progress=not args.no_progress,
    )
    vqa = None
    vqa_path = Path(args.vqa_model or DEFAULTS["vqa_model"])
    if args.vqa_model or vqa_path.exists():
        if not vqa_path.exists():
            raise SystemExit(f"albef serve: no VQA model at {vqa_path}")
        answers = Path(args.answers or DEFAULTS["answers"])
        if not answers.exists():
            raise SystemExit(f"albef serve: VQA needs an answer list; {answers} does not exist (pass --answers FILE)")
        try:
            vqa_model, answer_list = load_inference_model(vqa_path), read_answer_list(answers)
        except (NotAModelError, ValueError) as e:
            raise SystemExit(f"albef serve: {e}") from None
        if not isinstance(vqa_model, ALBEFForVQA):
            raise SystemExit(
                f"albef serve: {vqa_path} holds no VQA model ({type(vqa_model).__name__}); --vqa-model needs "
                "one (albef finetune vqa, or albef convert of the authors' VQA checkpoint)"
            )
        vqa = VQAPipeline(
            vqa_model, device=args.device, answer_list=answer_list, k=min(128, len(answer_list)), precision=precision
        )
    return create_app(
        pipe,
        index,
        vqa,
        model_name=str(model_path),
        allowed_hosts=_allowed_hosts(args),
        max_pixels=getattr(args, "max_pixels", None),
        max_upload_bytes=(round(args.max_upload_mb * 2**20) if getattr(args, "max_upload_mb", None) else None),
        max_decodes=getattr(args, "max_decodes", None),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    app = build_app(args)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    print(f"albef serve: open http://{'[' + shown + ']' if ':' in shown else shown}:{args.port}", flush=True)
    if args.host in ("0.0.0.0", "::", "") and not args.allowed_host:
        print(
            "albef serve: listening on every address, but answering only to localhost names; add "
            "--allowed-host NAME for each name or address it is reached by",
            flush=True,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
