"""The web app behind ``albef serve``: a page and JSON endpoints over one model and one image index.

Endpoints (all JSON; errors are ``{"error": message}`` with a 4xx status):

* ``GET  /api/info`` — model, number of indexed images, unreadable files, whether VQA is on.
* ``GET  /api/search?q=TEXT&k=16&top=8`` — text → image: ITC shortlist of ``k``, ITM re-rank,
  the best ``top`` with both scores.
* ``POST /api/match`` (form: ``text``, and ``image`` upload or ``index``) — ITM probability and
  ITC cosine of the pair.
* ``POST /api/ask`` (form: ``question``, and ``image`` or ``index``) — VQA over the answer list.
* ``POST /api/gradcam`` (form: ``text``, and ``image`` or ``index``) — where the model looks: a
  PNG overlay as a data URL, and the heat map grid.
* ``GET  /api/image/{index}`` — an indexed image file.

Endpoints are plain functions (FastAPI runs them in its thread pool, so the event loop keeps
serving); the model is shared by all requests and one lock serialises inference (Grad-CAM switches modules into
an attention-saving mode, which must not interleave with another request).

Example:
    >>> app = create_app(pipe, index)                                   # doctest: +SKIP
    >>> TestClient(app).get("/api/search", params={"q": "a red heart"}).json()["results"][0]   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from importlib import resources
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image

from albef.api import Pipeline, VQAPipeline
from albef.data.pretrain import load_image
from albef.serve.index import GalleryIndex

log = logging.getLogger("albef.serve")
MAX_UPLOAD_BYTES = 16 * 2**20
MAX_PIXELS = 40_000_000  # ~6300 x 6300; larger uploads are refused before decoding
MAX_TEXT_CHARS = 500


class BadInput(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def read_upload(data: bytes, filename: str | None) -> Image.Image:
    """An uploaded file as an RGB image, or a :class:`BadInput` that says what is wrong with it."""
    name = filename or "the upload"
    if not data:
        raise BadInput(f"{name} is empty; choose an image file (PNG, JPEG, ...)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadInput(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadInput(f"{name} is {img.width}x{img.height} pixels; the limit is {MAX_PIXELS:,} pixels "
                               "(scale it down first)", 413)
            img.load()
            return img.convert("RGB")
    except BadInput:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise BadInput(f"{name} is not an image this server can read ({type(e).__name__}); "
                       "upload a PNG, JPEG, GIF, BMP or WebP file") from e


def clean_text(text: str | None, what: str) -> str:
    text = (text or "").strip()
    if not text:
        raise BadInput(f"the {what} is empty; type some words")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInput(f"the {what} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


def overlay_data_url(image: Image.Image, heat: torch.Tensor) -> str:
    from albef.grounding import upsample_heatmap
    from albef.viz import overlay

    shown = image.copy()
    shown.thumbnail((384, 384))
    if max(shown.size) < 256:  # small images (emoji are 64 px): enlarge so the map can be seen
        f = 256 / max(shown.size)
        shown = shown.resize((round(shown.width * f), round(shown.height * f)), Image.Resampling.NEAREST)
    heat_img = upsample_heatmap(heat.float(), shown.height, shown.width)
    buf = io.BytesIO()
    overlay(shown, heat_img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(pipe: Pipeline, index: GalleryIndex, vqa: VQAPipeline | None = None, model_name: str = "") -> FastAPI:
    """The FastAPI app; ``vqa=None`` turns the question box off (``/api/ask`` answers 404)."""
    app = FastAPI(title="albef", description=__doc__.split("\n\n")[0])
    lock = threading.Lock()
    model = pipe.model

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        log.warning("%s %s: %s", request.method, request.url.path, msgs)
        return JSONResponse({"error": f"bad request: {msgs}"}, status_code=422)

    def pick_image(image: UploadFile | None, idx: int | None) -> Image.Image:
        if image is not None and image.filename:
            return read_upload(image.file.read(MAX_UPLOAD_BYTES + 1), image.filename)
        if idx is None:
            raise BadInput("give an image: upload a file or pick a gallery image")
        if not 0 <= idx < len(index):
            raise BadInput(f"gallery index {idx} is out of range (0..{len(index) - 1})", 404)
        try:
            return load_image(str(index.path(idx)))
        except (OSError, ValueError) as e:  # changed on disk since it was indexed
            raise BadInput(f"gallery image {index.names[idx]} can no longer be read ({e})", 410) from e

    def hit(i: int, itc: float, itm: float | None) -> dict:
        return {"index": i, "name": index.names[i], "url": f"/api/image/{i}", "itc": round(itc, 4),
                "itm": None if itm is None else round(itm, 4)}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("albef.serve").joinpath("static/index.html").read_text()

    @app.get("/api/info")
    def info() -> dict:
        return {"model": model_name, "images": len(index), "folder": str(index.folder), "bad_files": index.bad,
                "vqa": vqa is not None, "answers": len(vqa.answers) if vqa else 0,
                "embed_dim": model.config.embed_dim, "image_size": model.config.vision.image_size}

    @app.get("/api/image/{i}")
    def image_file(i: int):
        if not 0 <= i < len(index):
            raise BadInput(f"gallery index {i} is out of range (0..{len(index) - 1})", 404)
        return FileResponse(index.path(i))

    @app.get("/api/search")
    def search(q: str = "", k: int = 16, top: int = 8, rerank: bool = True) -> dict:
        q = clean_text(q, "query")
        if len(index) == 0:
            raise BadInput("the image index is empty: the folder has no readable images", 409)
        k, top = max(1, min(k, 256, len(index))), max(1, min(top, 64))
        with lock:
            hits = pipe.retrieve_embedded(q, index.image_feat, index.image_embeds, k, top, rerank)
        return {"query": q, "results": [hit(h.index, h.itc, h.itm) for h in hits]}

    @app.post("/api/match")
    def match(text: Annotated[str, Form()] = "", image: Annotated[UploadFile | None, File()] = None,
              index_: Annotated[int | None, Form(alias="index")] = None) -> dict:
        text = clean_text(text, "caption")
        img = pick_image(image, index_)
        with lock:
            itm = float(pipe.match([img], [text])[0])
            itc = float(pipe.similarity([img], [text])[0, 0])
        return {"text": text, "itm": round(itm, 4), "itc": round(itc, 4)}

    @app.post("/api/ask")
    def ask(question: Annotated[str, Form()] = "", image: Annotated[UploadFile | None, File()] = None,
            index_: Annotated[int | None, Form(alias="index")] = None, top: Annotated[int, Form()] = 5) -> dict:
        if vqa is None:
            raise BadInput("this server has no VQA model; start it with --vqa-model DIR and --answers FILE", 404)
        question = clean_text(question, "question")
        img = pick_image(image, index_)
        with lock:
            a = vqa.answer([img], [question])[0]
        return {"question": question, "answer": a.answer,
                "candidates": [{"answer": x, "score": round(float(s), 4)} for x, s in a.candidates[:max(1, top)]]}

    @app.post("/api/gradcam")
    def gradcam(text: Annotated[str, Form()] = "", image: Annotated[UploadFile | None, File()] = None,
                index_: Annotated[int | None, Form(alias="index")] = None) -> dict:
        text = clean_text(text, "text")
        img = pick_image(image, index_)
        with lock:
            g = pipe.ground(img, text)
        return {"text": text, "overlay": overlay_data_url(img, g.heatmap), "grid": g.heatmap.tolist()}

    return app
