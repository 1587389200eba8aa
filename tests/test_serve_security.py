"""``albef serve`` against bad and hostile requests, through its HTTP API: text the model cannot
read, foreign Host headers (DNS rebinding), cross-origin posts, server paths in answers, bodies
over the limit, image bombs, and odd inputs on every endpoint (never a 500)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image, ImageFile

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from albef.api import Pipeline, VQAPipeline  # noqa: E402
from albef.models.albef import ALBEF  # noqa: E402
from albef.models.tasks import ALBEFForVQA  # noqa: E402
from albef.search.gallery import GalleryIndex  # noqa: E402
from albef.serve import app as serve_app  # noqa: E402
from albef.serve.app import create_app  # noqa: E402
from albef.serve.images import ImageDecoder  # noqa: E402

BASE = "http://localhost:8000"
ENDPOINTS = [("/api/match", "text"), ("/api/gradcam", "text"), ("/api/ask", "question")]


def image_bytes(size=(40, 40), colour=(200, 10, 10), fmt="PNG", mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode in ("RGB", "RGBA") else None).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """6000 x 6000 px, one colour: ~120 KB of PNG, 144 MB once decoded."""
    return image_bytes((6000, 6000))


@pytest.fixture
def gallery(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, c in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
        Image.new("RGB", (48, 40), c).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


@pytest.fixture
def pipe(tiny_config):
    return Pipeline(ALBEF(tiny_config, mlm_head=False), device="cpu")


@pytest.fixture
def index(pipe, gallery, tmp_path):
    return GalleryIndex.build(pipe, gallery, tmp_path / "cache", model_id="m1", progress=False)


@pytest.fixture
def vqa(tiny_config):
    return VQAPipeline(ALBEFForVQA(tiny_config), device="cpu", answer_list=["red", "green", "blue"], k=3)


@pytest.fixture
def app(pipe, index, vqa, tmp_path):
    return create_app(pipe, index, vqa, model_name=str(tmp_path / "models" / "tiny"))


@pytest.fixture
def client(app):
    return TestClient(app, base_url=BASE, raise_server_exceptions=False)


# --- 2. text the model cannot read ---------------------------------------------------------------


@pytest.mark.parametrize("text", ["!!!", "?!", "...", "- / -", "''", "\u200b", "\x00\x01"])
def test_punctuation_only_text_is_a_json_400_on_every_endpoint(client, text):
    r = client.get("/api/search", params={"q": text})
    assert r.status_code == 400 and "no words once punctuation is removed" in r.json()["error"], r.text
    for path, field in ENDPOINTS:
        for extra in ({"index": "0"}, {}):  # by gallery index, and with an upload
            files = {} if extra else {"image": ("red.png", image_bytes(), "image/png")}
            r = client.post(path, data={field: text, **extra}, files=files)
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path, r.text)
            assert "no words once punctuation is removed" in r.json()["error"]
    assert client.get("/api/search", params={"q": "red!"}).status_code == 200  # punctuation with words is fine


def test_odd_inputs_on_every_endpoint_never_give_a_500(client, index, gallery):
    def check(r, *ok):
        assert r.status_code < 500 and r.headers["content-type"] == "application/json", r.text
        if ok:
            assert r.status_code in ok, r.text
        if r.status_code >= 400:
            assert r.json()["error"]

    for q in ["a\x00b", "%", "\U0001f600", "x" * 500, "\ufeff red"]:
        check(client.get("/api/search", params={"q": q}), 200)
    check(client.get("/api/search?q=ok%ED%A0%80%FF"), 200)  # invalid UTF-8: replaced, not a crash
    check(client.get("/api/search", params={"q": "red", "k": "-99999999999999999999", "top": "10**9"}), 422)
    check(client.get("/api/search", params={"q": "red", "k": "-99999999999999999999", "top": "0"}), 200)
    for i in ("-1", "99999999999999999999999", "abc"):
        check(client.get(f"/api/image/{i}"), 404, 422)
    check(client.get("/nope"), 404)
    check(client.put("/api/match"), 405)
    check(client.options("/api/match"), 405)
    # images PIL opens in all their modes, and files it must refuse
    for fmt, mode in [
        ("PNG", "I;16"),
        ("PNG", "1"),
        ("PNG", "P"),
        ("PNG", "LA"),
        ("PNG", "RGBA"),
        ("JPEG", "CMYK"),
        ("JPEG", "L"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("WEBP", "RGBA"),
    ]:
        for path, field in ENDPOINTS:
            files = {"image": (f"x.{fmt.lower()}", image_bytes((50, 30), fmt=fmt, mode=mode), "image/png")}
            check(client.post(path, data={field: "red"}, files=files), 200)
    for size in [(1, 1), (1, 3000), (16000, 200)]:  # extreme shapes, under the pixel limit
        files = {"image": ("x.png", image_bytes(size), "image/png")}
        check(client.post("/api/gradcam", data={"text": "red"}, files=files), 200)
    for name, data in [
        ("x.tif", image_bytes(fmt="TIFF")),
        ("trunc.png", image_bytes((300, 300))[:200]),
        ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
        ("x.png", b"\x89PNG\r\n\x1a\n"),
    ]:
        check(client.post("/api/match", data={"text": "red"}, files={"image": (name, data, "image/png")}), 400)
    # malformed forms
    check(client.post("/api/match", content=b"garbage", headers={"content-type": "multipart/form-data"}), 400)
    check(
        client.post(
            "/api/match",
            content=b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nzz',
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    )
    check(client.post("/api/match", data={"text": "red", "image": "not-a-file"}), 422)
    check(client.post("/api/match", data={"text": "red", "index": "1.5"}), 422)
    check(client.post("/api/match", json={"text": "red", "index": 0}), 400)
    check(client.post("/api/ask", data={"question": "red?", "index": "0", "top": "-5"}), 200)
    # the gallery changed on disk since it was indexed
    (gallery / index.names[0]).unlink()
    check(client.post("/api/match", data={"text": "red", "index": "0"}), 410)
    check(client.get("/api/image/0"), 410)
    (gallery / index.names[1]).write_bytes(b"junk")
    check(client.post("/api/gradcam", data={"text": "red", "index": "1"}), 410)


# --- 3. Host and Origin ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "evil.example.com",
        "evil.example.com:8000",
        "localhost.evil.example.com",
        "127.0.0.1.nip.io:8000",
        "localhost:abc",
        "[::1",
        "",
    ],
)
def test_a_foreign_host_is_not_answered(app, host):
    c = TestClient(app, base_url=BASE)
    for path in ("/api/info", "/api/image/0", "/", "/api/search?q=red"):
        r = c.get(path, headers={"host": host})
        assert r.status_code == 421 and "answers only to" in r.json()["error"], (host, path, r.text)
    assert c.post("/api/match", data={"text": "red", "index": "0"}, headers={"host": host}).status_code == 421


@pytest.mark.parametrize(
    "base",
    [
        "http://localhost",
        "http://localhost:8000",
        "http://127.0.0.1:1234",
        "http://[::1]:8000",
        "http://LOCALHOST:8000",
    ],
)
def test_the_local_host_names_are_answered_on_any_port(app, base):
    c = TestClient(app, base_url=base)
    assert c.get("/api/info").status_code == 200 and c.get("/api/image/0").status_code == 200


def test_allowed_host_option_adds_names(tmp_path, gallery, monkeypatch):
    from albef.checkpoints.pretrained import save_pretrained
    from albef.cli.serve import build_app, parser
    from albef.config import get_preset

    monkeypatch.chdir(tmp_path)
    save_pretrained(ALBEF(get_preset("albef-tiny"), mlm_head=False), tmp_path / "model")
    common = [
        "--model",
        str(tmp_path / "model"),
        "--images",
        str(gallery),
        "--cache-dir",
        str(tmp_path / "c"),
        "--no-progress",
    ]
    app = build_app(
        parser().parse_args(
            [
                *common,
                "--allowed-host",
                "demo.example",
                "--allowed-host",
                "::2",
                "--host",
                "192.168.7.7",
                "--max-pixels",
                "5000",
                "--max-upload-mb",
                "0.5",
                "--max-decodes",
                "1",
            ]
        )
    )
    for base in (
        "http://demo.example:8000",
        "http://DEMO.example",
        "http://[::2]:80",
        "http://192.168.7.7:8000",
        "http://localhost:8000",
    ):
        assert TestClient(app, base_url=base).get("/api/info").status_code == 200, base
    c = TestClient(app, base_url="http://other.example:8000")
    assert c.get("/api/info").status_code == 421
    info = TestClient(app, base_url=BASE).get("/api/info").json()
    assert info["limits"] == {"upload_bytes": 2**19, "pixels": 5000, "decodes": 1, "text_chars": 500}
    star = build_app(parser().parse_args([*common, "--allowed-host", "*"]))
    assert TestClient(star, base_url="http://anything.example").get("/api/info").status_code == 200
    with pytest.raises(SystemExit):
        parser().parse_args([*common, "--max-pixels", "0"])


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example.com",
        "http://localhost:8001",
        "https://localhost:8000",
        "http://localhost",
        "null",
        "file://",
        "http://localhost:8000.evil.example",
    ],
)
def test_a_cross_origin_post_is_refused(client, origin):
    for path, field in ENDPOINTS:
        r = client.post(path, data={field: "red", "index": "0"}, headers={"origin": origin})
        assert r.status_code == 403 and "cross-origin POST refused" in r.json()["error"], (origin, r.text)
        assert not any(h.lower().startswith("access-control-") for h in r.headers)


def test_same_origin_and_origin_less_posts_work_and_no_cors_headers_are_sent(client):
    for headers in ({"origin": BASE}, {"origin": "http://LOCALHOST:8000"}, {}):
        r = client.post("/api/match", data={"text": "red", "index": "0"}, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    # a cross-origin read gets its answer, but no CORS header lets a browser hand it to the page
    r = client.get("/api/info", headers={"origin": "http://evil.example.com"})
    assert r.status_code == 200 and not any(h.lower().startswith("access-control-") for h in r.headers)
    r = client.options(
        "/api/match", headers={"origin": "http://evil.example.com", "access-control-request-method": "POST"}
    )
    assert not any(h.lower().startswith("access-control-") for h in r.headers)


def test_answers_show_no_absolute_server_path(client, index, tmp_path):
    info = client.get("/api/info")
    for text in (info.text, client.get("/").text, json.dumps(info.json())):
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    body = info.json()
    assert body["folder"] == "images" and body["model"] == "tiny"
    assert body["bad_files"] == [{"file": "broken.png", "error": body["bad_files"][0]["error"]}]
    assert "broken.png" in body["bad_files"][0]["error"]
    # an index cached by an older version, whose messages hold absolute paths, is shown redacted
    index.bad.append({"file": "x.png", "error": f"cannot identify image file '{index.folder.resolve()}/x.png'"})
    assert str(tmp_path) not in client.get("/api/info").text
    # a deleted gallery file: the error names the file, not where it was
    (index.folder / index.names[0]).unlink()
    r = client.post("/api/match", data={"text": "red", "index": "0"})
    assert r.status_code == 410 and str(tmp_path) not in r.text


# --- 1. body size and image bombs ----------------------------------------------------------------


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks):
    """Drive the ASGI app by hand: (status, JSON body, body bytes the app pulled)."""
    pulled, messages = 0, []
    it = iter(chunks)

    async def receive():
        nonlocal pulled
        chunk = next(it, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/match",
        "raw_path": b"/api/match",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost:8000"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], json.loads(body), pulled


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_read(app):
    def endless():
        while True:
            yield b"\0" * 65536

    ct = (b"content-type", b"multipart/form-data; boundary=x")
    status, body, pulled = _asgi_post(app, [ct, (b"content-length", str(300 * 2**20).encode())], endless())
    assert status == 413 and pulled == 0
    assert body["error"] == (
        "the request body is 300 MB (its Content-Length); the limit is 16.1 MB (an image of up "
        "to 16 MB and 64 KB for the form's other fields)"
    )


def test_a_streamed_body_over_the_limit_is_cut_off_as_it_arrives(app):
    head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    chunks = [head] + [b"\0" * 65536] * (300 * 16)  # 300 MB, no Content-Length (chunked)
    t0 = time.monotonic()
    status, body, pulled = _asgi_post(app, [(b"content-type", b"multipart/form-data; boundary=x")], chunks)
    limit = 16 * 2**20 + 64 * 2**10
    assert status == 413 and limit < pulled <= limit + 65536 + len(head)
    assert body["error"].startswith("the request body passed the limit of 16.1 MB (an image of up to 16 MB")
    assert body["error"].endswith(f": {pulled / 2**20:.1f} MB had arrived when the server stopped reading it")
    assert time.monotonic() - t0 < 10


def test_a_large_pixel_png_is_refused_from_its_header_without_decoding(client, bomb, monkeypatch):
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    assert len(bomb) < 200_000
    for path, field in ENDPOINTS:
        t0 = time.monotonic()
        r = client.post(path, data={field: "red"}, files={"image": ("bomb.png", bomb, "image/png")})
        elapsed = time.monotonic() - t0
        assert r.status_code == 413, r.text
        assert r.json()["error"] == (
            "bomb.png is 6000x6000 = 36,000,000 pixels; the limit is 16,000,000 pixels (scale it down first)"
        )
        assert elapsed < 0.5, f"{elapsed:.2f} s: decoded?"
    assert loads == []  # never decoded


def test_large_images_are_decoded_reduced_and_a_few_at_a_time(app, client, monkeypatch):
    decoder: ImageDecoder = app.state.decoder
    assert decoder.max_decodes == serve_app.MAX_DECODES == 2
    drafts = []
    from PIL import JpegImagePlugin

    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: drafts.append(size) or original(self, mode, size),
    )
    photo = image_bytes((4000, 3000), fmt="JPEG")  # a 12 Mpx photo: decoded at 1/4 scale (1000 x 750) ...
    png = image_bytes((3000, 2000))  # decoded whole, then box-reduced by 7 x 5
    img = decoder.decode(io.BytesIO(photo), "p.jpg", 16_000_000)
    assert drafts == [(384, 384)] and img.size == (500, 750)  # ... then box-reduced by 2 x 1
    assert img.info["original_size"] == (4000, 3000) and img.mode == "RGB"
    img = decoder.decode(io.BytesIO(png), "p.png", 16_000_000)
    assert img.size == (429, 400) and img.mode == "RGB"  # each side in [384, 768)
    # the overlay keeps the original's aspect
    r = client.post("/api/gradcam", data={"text": "red"}, files={"image": ("p.png", png, "image/png")})
    from base64 import b64decode

    shown = Image.open(io.BytesIO(b64decode(r.json()["overlay"].split(",", 1)[1])))
    assert shown.size == (384, 256)
    # a burst of uploads: never more than max_decodes decodes at once
    decoder.peak_in_flight = 0
    files = {"image": ("p.png", png, "image/png")}
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(
            pool.map(lambda _: client.post("/api/match", data={"text": "red"}, files=files).status_code, range(8))
        )
    assert codes == [200] * 8 and 1 <= decoder.peak_in_flight <= 2


def test_model_answers_on_reduced_images_match_the_full_resolution_ones(app, client, pipe):
    """The reduced decode changes only what the model's own resize would have averaged away."""
    src = Image.radial_gradient("L").resize((2048, 1536)).convert("RGB")
    buf = io.BytesIO()
    src.save(buf, "PNG")
    r = client.post(
        "/api/match", data={"text": "a round shape"}, files={"image": ("g.png", buf.getvalue(), "image/png")}
    ).json()
    full = float(pipe.match([src], ["a round shape"])[0])
    assert r["itm"] == pytest.approx(full, abs=2e-3)
    px_full = pipe.processor.images([src])
    px_red = pipe.processor.images([app.state.decoder.decode(io.BytesIO(buf.getvalue()), "g.png", None)])
    assert torch.allclose(px_full, px_red, atol=0.1)
