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

Limits (see :mod:`albef.serve.guard` and :mod:`albef.serve.images`): only the configured host names are
answered and only the server's own page may POST; a request body over the upload limit is refused with
413 while it streams; an image is refused from its header above the pixel limit, decoded at most
``max_decodes`` at a time, at the resolution the model uses. Answers show no absolute server path.

Example:
    >>> app = create_app(pipe, index)                                   # doctest: +SKIP
    >>> client = TestClient(app, base_url="http://localhost")  # a name the server answers   # doctest: +SKIP
    >>> client.get("/api/search", params={"q": "a red heart"}).json()["results"][0]           # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import unicodedata
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from albef.api import Pipeline, VQAPipeline
from albef.search.gallery import GalleryIndex
from albef.serve.guard import DEFAULT_ALLOWED_HOSTS, RequestGuard
from albef.serve.images import BadInput, ImageDecoder, format_bytes
from albef.text import clean_caption, clean_question

log = logging.getLogger("albef.serve")
MAX_UPLOAD_BYTES = 16 * 2**20  # an image file; the request body may be FORM_ALLOWANCE larger
FORM_ALLOWANCE = 64 * 2**10  # multipart framing and the text fields (500 characters at most)
# Checked from the header before decoding. The model sees 64-384 px and the page 384 px, so this
# only has to let common files through: 12-16 Mpx phone photos (decoded at 1/2-1/8 scale anyway),
# 4K/5K screenshots (8.3/14.7 Mpx). A full decode is <= 4 bytes a pixel: 64 MB at the limit.
MAX_PIXELS = 16_000_000
MAX_DECODES = 2  # full decodes in flight (one per core of a small machine); a burst waits its turn
MAX_TEXT_CHARS = 500

__all__ = ["BadInput", "create_app", "MAX_UPLOAD_BYTES", "MAX_PIXELS", "MAX_DECODES", "public_name"]


def clean_text(
    text: str | None, what: str, cleaner: Callable[[str, str, int], str] = clean_caption, style: str = "albef"
) -> str:
    """The text as typed (stripped), or a :class:`BadInput` if it is empty, too long, or holds
    nothing the model reads once cleaned like the model's training text (punctuation only, control
    characters only)."""
    text = (text or "").strip()
    if not text:
        raise BadInput(f"the {what} is empty; type some words")
    if len(text) > MAX_TEXT_CHARS:
        raise BadInput(f"the {what} has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise BadInput(f"the {what} holds an unpaired UTF-16 surrogate, which is not text; retype it")
    try:
        cleaned = cleaner(text, style)
    except ValueError as e:
        raise BadInput(f"the {what} cannot be read: {e}") from e
    if not any(unicodedata.category(c)[0] not in "CZ" for c in cleaned):
        raise BadInput(f"the {what} {text[:40]!r} has no words once punctuation is removed; type some words")
    return text


def public_name(path: str | Path) -> str:
    """A path as the page may show it: as given when relative (and not climbing up with ``..``),
    else only its base name — answers never show where files are on the server."""
    p = Path(path)
    if str(path) and not p.is_absolute() and ".." not in p.parts:
        return p.as_posix()
    return p.name


def overlay_data_url(image: Image.Image, heat: torch.Tensor) -> str:
    from albef.gradcam import upsample_heatmap
    from albef.viz import overlay

    original = image.info.get("original_size", image.size)
    if tuple(original) == image.size:
        shown = image.copy()
        shown.thumbnail((384, 384))
    else:  # decoded reduced (albef.serve.images): back to the original's aspect
        w, h = original
        f = min(1.0, 384 / w, 384 / h)
        shown = image.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.BICUBIC)
    if max(shown.size) < 256:  # small images (emoji are 64 px): enlarge so the map can be seen
        f = 256 / max(shown.size)
        shown = shown.resize((round(shown.width * f), round(shown.height * f)), Image.Resampling.NEAREST)
    heat_img = upsample_heatmap(heat.float(), shown.height, shown.width)
    buf = io.BytesIO()
    overlay(shown, heat_img).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def create_app(
    pipe: Pipeline,
    index: GalleryIndex,
    vqa: VQAPipeline | None = None,
    model_name: str = "",
    *,
    allowed_hosts: Iterable[str] = (),
    max_pixels: int | None = None,
    max_upload_bytes: int | None = None,
    max_decodes: int | None = None,
) -> FastAPI:
    """The FastAPI app; ``vqa=None`` turns the question box off (``/api/ask`` answers 404).

    ``allowed_hosts`` are host names answered besides localhost, 127.0.0.1 and [::1] (``"*"``: any);
    a limit left ``None`` follows this module's constant (``MAX_PIXELS``, ``MAX_UPLOAD_BYTES``,
    ``MAX_DECODES``)."""
    app = FastAPI(title="albef", description=__doc__.split("\n\n")[0])
    lock = threading.Lock()
    model = pipe.model
    target = max(384, model.config.vision.image_size)  # the model's input, the page's overlay
    decoder = ImageDecoder(max_decodes or MAX_DECODES, target)
    app.state.decoder = decoder

    def upload_limit() -> int:
        return max_upload_bytes if max_upload_bytes is not None else MAX_UPLOAD_BYTES

    def pixel_limit() -> int:
        return max_pixels if max_pixels is not None else MAX_PIXELS

    def body_limit() -> tuple[int, str]:
        up = upload_limit()
        return up + FORM_ALLOWANCE, (
            f"{format_bytes(up + FORM_ALLOWANCE)} (an image of up to {format_bytes(up)} "
            f"and {format_bytes(FORM_ALLOWANCE)} for the form's other fields)"
        )

    app.add_middleware(RequestGuard, allowed_hosts=[*DEFAULT_ALLOWED_HOSTS, *allowed_hosts], body_limit=body_limit)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if not request.scope.get("albef.body_too_large"):  # else the guard answers 413 and logs it
            log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        log.warning("%s %s: %s", request.method, request.url.path, msgs)
        return JSONResponse({"error": f"bad request: {msgs}"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: JSON like every other answer, no details
        log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
        return JSONResponse(
            {"error": f"internal server error ({type(exc).__name__}); see the server log"}, status_code=500
        )

    def pick_image(image: UploadFile | None, idx: int | None) -> Image.Image:
        if image is not None and image.filename:
            name = image.filename[:100]
            f = image.file  # spooled to disk above 1 MB: the bytes are never all in memory
            f.seek(0, io.SEEK_END)
            size = f.tell()
            f.seek(0)
            if size == 0:
                raise BadInput(f"{name} is empty; choose an image file (PNG, JPEG, ...)")
            if size > upload_limit():
                raise BadInput(
                    f"{name} is {format_bytes(size)}; the upload limit is {format_bytes(upload_limit())}", 413
                )
            return decoder.decode(f, name, pixel_limit())
        if idx is None:
            raise BadInput("give an image: upload a file or pick a gallery image")
        if not 0 <= idx < len(index):
            raise BadInput(f"gallery index {idx} is out of range (0..{len(index) - 1})", 404)
        try:
            with open(index.path(idx), "rb") as f:  # the operator's own files: no pixel limit, same bounded decode
                return decoder.decode(f, index.names[idx], None, formats=None)
        except (OSError, BadInput) as e:  # changed on disk since it was indexed
            if isinstance(e, BadInput) and e.status != 400:
                raise
            why = (e.strerror or type(e).__name__) if isinstance(e, OSError) else "not a readable image any more"
            raise BadInput(f"gallery image {index.names[idx]} can no longer be read ({why})", 410) from e

    def hit(i: int, itc: float, itm: float | None) -> dict:
        return {
            "index": i,
            "name": index.names[i],
            "url": f"/api/image/{i}",
            "itc": round(itc, 4),
            "itm": None if itm is None else round(itm, 4),
        }

    def redact(text: str) -> str:
        for prefix in {str(index.folder.resolve()), str(index.folder.absolute()), str(index.folder)}:
            text = text.replace(prefix + "/", "").replace(prefix, public_name(index.folder))
        return text

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("albef.serve").joinpath("static/index.html").read_text()

    @app.get("/api/info")
    def info() -> dict:
        return {
            "model": public_name(model_name),
            "images": len(index),
            "folder": public_name(index.folder),
            "bad_files": [{**b, "file": redact(b["file"]), "error": redact(b["error"])} for b in index.bad],
            "vqa": vqa is not None,
            "answers": len(vqa.answers) if vqa else 0,
            "embed_dim": model.config.embed_dim,
            "image_size": model.config.vision.image_size,
            "limits": {
                "upload_bytes": upload_limit(),
                "pixels": pixel_limit(),
                "decodes": decoder.max_decodes,
                "text_chars": MAX_TEXT_CHARS,
            },
        }

    @app.get("/api/image/{i}")
    def image_file(i: int):
        if not 0 <= i < len(index):
            raise BadInput(f"gallery index {i} is out of range (0..{len(index) - 1})", 404)
        path = index.path(i)
        if not path.is_file():
            raise BadInput(f"gallery image {index.names[i]} is no longer there", 410)
        return FileResponse(path)

    @app.get("/api/search")
    def search(q: str = "", k: int = 16, top: int = 8, rerank: bool = True) -> dict:
        q = clean_text(q, "query", clean_caption, pipe.processor.cleaning)
        if len(index) == 0:
            raise BadInput("the image index is empty: the folder has no readable images", 409)
        k, top = max(1, min(k, 256, len(index))), max(1, min(top, 64))
        with lock:
            hits = pipe.retrieve_embedded(q, index.image_feat, index.image_embeds, k, top, rerank)
        return {"query": q, "results": [hit(h.index, h.itc, h.itm) for h in hits]}

    @app.post("/api/match")
    def match(
        text: Annotated[str, Form()] = "",
        image: Annotated[UploadFile | None, File()] = None,
        index_: Annotated[int | None, Form(alias="index")] = None,
    ) -> dict:
        text = clean_text(text, "caption", clean_caption, pipe.processor.cleaning)
        img = pick_image(image, index_)
        with lock:
            itm = float(pipe.match([img], [text])[0])
            itc = float(pipe.similarity([img], [text])[0, 0])
        return {"text": text, "itm": round(itm, 4), "itc": round(itc, 4)}

    @app.post("/api/ask")
    def ask(
        question: Annotated[str, Form()] = "",
        image: Annotated[UploadFile | None, File()] = None,
        index_: Annotated[int | None, Form(alias="index")] = None,
        top: Annotated[int, Form()] = 5,
    ) -> dict:
        if vqa is None:
            raise BadInput("this server has no VQA model; start it with --vqa-model DIR and --answers FILE", 404)
        question = clean_text(question, "question", clean_question, vqa.processor.cleaning)
        img = pick_image(image, index_)
        with lock:
            a = vqa.answer([img], [question])[0]
        return {
            "question": question,
            "answer": a.answer,
            "candidates": [{"answer": x, "score": round(float(s), 4)} for x, s in a.candidates[: max(1, top)]],
        }

    @app.post("/api/gradcam")
    def gradcam(
        text: Annotated[str, Form()] = "",
        image: Annotated[UploadFile | None, File()] = None,
        index_: Annotated[int | None, Form(alias="index")] = None,
    ) -> dict:
        text = clean_text(text, "text", clean_caption, pipe.processor.cleaning)
        img = pick_image(image, index_)
        with lock:
            g = pipe.ground(img, text)
        return {"text": text, "overlay": overlay_data_url(img, g.heatmap), "grid": g.heatmap.tolist()}

    return app
