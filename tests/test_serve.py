"""``albef serve``: the index cache, every endpoint, bad inputs and concurrent requests."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from albef.api import Pipeline, VQAPipeline  # noqa: E402
from albef.config import get_preset  # noqa: E402
from albef.models.albef import ALBEF  # noqa: E402
from albef.models.tasks import ALBEFForVQA  # noqa: E402
from albef.search.gallery import GalleryIndex  # noqa: E402
from albef.serve import app as serve_app  # noqa: E402
from albef.serve.app import create_app  # noqa: E402

BASE = "http://localhost"  # the server answers only to its configured host names (TestClient's default is "testserver")
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 220, 20), (20, 20, 20), (250, 250, 250)]


def png_bytes(size=(40, 40), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def gallery(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, c in enumerate(COLOURS):
        Image.new("RGB", (48, 40), c).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image, not indexed")
    return folder


@pytest.fixture
def pipe(tiny_config):
    return Pipeline(ALBEF(tiny_config, mlm_head=False), device="cpu")


@pytest.fixture
def index(pipe, gallery, tmp_path):
    return GalleryIndex.build(pipe, gallery, tmp_path / "cache", model_id="m1", progress=False)


@pytest.fixture
def vqa(tiny_config):
    return VQAPipeline(ALBEFForVQA(tiny_config), device="cpu", answer_list=["red", "green", "blue", "yes", "no"], k=3)


@pytest.fixture
def client(pipe, index, vqa):
    return TestClient(create_app(pipe, index, vqa, model_name="tiny"), base_url=BASE)


def test_index_skips_unreadable_files_and_reuses_its_cache(pipe, gallery, index, tmp_path):
    assert len(index) == len(COLOURS) and not index.from_cache
    assert [b["file"] for b in index.bad] == ["broken.png"]
    assert "sub/img1.png" in index.names and not any(n.endswith(".txt") for n in index.names)
    again = GalleryIndex.build(pipe, gallery, tmp_path / "cache", model_id="m1", progress=False)
    assert again.from_cache and again.names == index.names and again.bad == index.bad
    assert torch.equal(again.image_feat, index.image_feat) and torch.equal(again.image_embeds, index.image_embeds)
    # the features are the model's own
    px = pipe.processor.images([gallery / index.names[0]])
    with torch.no_grad():
        ref = pipe.model.image_feat(pipe.model.encode_image(px))
    torch.testing.assert_close(index.image_feat[:1], ref)
    # a new file, or another model, invalidates the cache
    Image.new("RGB", (30, 30), (1, 2, 3)).save(gallery / "new.png")
    assert not GalleryIndex.build(pipe, gallery, tmp_path / "cache", model_id="m1", progress=False).from_cache
    assert not GalleryIndex.build(pipe, gallery, tmp_path / "cache", model_id="m2", progress=False).from_cache


def test_index_of_a_missing_folder_says_what_to_do(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="--images"):
        GalleryIndex.build(pipe, tmp_path / "nope", progress=False)


def test_info_and_page(client):
    info = client.get("/api/info").json()
    assert info["images"] == len(COLOURS) and info["vqa"] and info["answers"] == 5
    assert info["bad_files"][0]["file"] == "broken.png"
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert client.get("/api/image/0").headers["content-type"] == "image/png"
    assert client.get("/api/image/99").status_code == 404


def test_search_ranks_the_shortlist_by_itm_like_the_pipeline(client, pipe, gallery, index):
    r = client.get("/api/search", params={"q": "a red square", "k": 4, "top": 3})
    assert r.status_code == 200
    hits = r.json()["results"]
    assert len(hits) == 3 and [h["itm"] for h in hits] == sorted((h["itm"] for h in hits), reverse=True)
    expected = pipe.retrieve("a red square", [gallery / n for n in index.names], k=4, top=3)
    assert [h["index"] for h in hits] == [e.index for e in expected]
    for h, e in zip(hits, expected, strict=True):
        assert h["itm"] == pytest.approx(e.itm, abs=2e-3) and h["itc"] == pytest.approx(e.itc, abs=1e-3)
    itc_only = client.get("/api/search", params={"q": "a red square", "rerank": "false"}).json()["results"]
    assert all(h["itm"] is None for h in itc_only)
    assert [h["itc"] for h in itc_only] == sorted((h["itc"] for h in itc_only), reverse=True)


@pytest.mark.parametrize(
    "params, status, message",
    [
        ({"q": ""}, 400, "query is empty"),
        ({"q": "   "}, 400, "query is empty"),
        ({"q": "x" * 600}, 400, "limit is 500"),
        ({"q": "red", "k": "many"}, 422, "k"),
    ],
)
def test_search_rejects_bad_queries_with_a_message(client, params, status, message):
    r = client.get("/api/search", params=params)
    assert r.status_code == status and message in r.json()["error"]


def test_match_by_gallery_index_and_by_upload_agree(client, pipe, gallery, index):
    i = index.names.index("img0.png")
    by_index = client.post("/api/match", data={"text": "a red square", "index": str(i)}).json()
    upload = {"image": ("red.png", (gallery / "img0.png").read_bytes(), "image/png")}
    by_upload = client.post("/api/match", data={"text": "a red square"}, files=upload).json()
    assert by_index["itm"] == pytest.approx(by_upload["itm"], abs=1e-4)
    assert by_index["itm"] == pytest.approx(float(pipe.match([gallery / "img0.png"], ["a red square"])[0]), abs=1e-4)


@pytest.mark.parametrize(
    "name, content, status, message",
    [
        ("notes.txt", b"hello, I am text", 400, "notes.txt is not an image"),
        ("empty.png", b"", 400, "empty.png is empty"),
        ("huge.png", None, 413, "the limit is"),
    ],
)
def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(
    client, monkeypatch, name, content, status, message
):
    if content is None:  # a small file that decodes to too many pixels
        monkeypatch.setattr(serve_app, "MAX_PIXELS", 1000)
        content = png_bytes((64, 64))
    for path, field in (("/api/match", "text"), ("/api/gradcam", "text"), ("/api/ask", "question")):
        r = client.post(path, data={field: "a red square"}, files={"image": (name, content, "image/png")})
        assert r.status_code == status and message in r.json()["error"], (path, r.json())
    assert client.get("/api/search", params={"q": "red"}).status_code == 200


def test_oversized_upload_is_refused_before_decoding(client, monkeypatch):
    monkeypatch.setattr(serve_app, "MAX_UPLOAD_BYTES", 100)
    r = client.post("/api/match", data={"text": "red"}, files={"image": ("big.png", png_bytes(), "image/png")})
    size = len(png_bytes())
    assert r.status_code == 413  # small sizes are named in bytes, large ones in MB (the limit's own unit)
    assert r.json()["error"] == f"big.png is {size} bytes; the upload limit is 100 bytes"


def test_missing_image_and_bad_index(client):
    r = client.post("/api/match", data={"text": "red"})
    assert r.status_code == 400 and "upload a file or pick a gallery image" in r.json()["error"]
    r = client.post("/api/gradcam", data={"text": "red", "index": "42"})
    assert r.status_code == 404 and "out of range" in r.json()["error"]
    r = client.post("/api/match", data={"text": "", "index": "0"})
    assert r.status_code == 400 and "caption is empty" in r.json()["error"]


def test_gradcam_returns_a_png_overlay_and_the_grid(client, pipe, gallery, index):
    r = client.post("/api/gradcam", data={"text": "a red square", "index": "0"}).json()
    header, data = r["overlay"].split(",", 1)
    assert header == "data:image/png;base64"
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    assert img.format == "PNG" and img.width > 0
    g = pipe.model.config.vision.grid_size
    grid = torch.tensor(r["grid"])
    assert grid.shape == (g, g) and (grid >= 0).all()
    torch.testing.assert_close(
        grid, pipe.ground(gallery / index.names[0], "a red square").heatmap, atol=1e-5, rtol=1e-4
    )


def test_ask_answers_from_the_list_and_without_vqa_says_how_to_enable_it(client, pipe, index):
    r = client.post("/api/ask", data={"question": "what color is it?", "index": "0"}).json()
    assert r["answer"] in {"red", "green", "blue", "yes", "no"} and len(r["candidates"]) == 3
    scores = [c["score"] for c in r["candidates"]]
    assert scores == sorted(scores, reverse=True)
    no_vqa = TestClient(create_app(pipe, index, None), base_url=BASE)
    r = no_vqa.post("/api/ask", data={"question": "what color is it?", "index": "0"})
    assert r.status_code == 404 and "--vqa-model" in r.json()["error"]


def test_concurrent_requests_give_the_sequential_answers(client):
    queries = ["a red square", "green", "a blue thing", "yellow light", "black", "white snow"] * 2
    sequential = [client.get("/api/search", params={"q": q}).json() for q in queries]
    cams = [client.post("/api/gradcam", data={"text": q, "index": "1"}).json()["grid"] for q in queries[:4]]

    def search(q):
        return client.get("/api/search", params={"q": q}).json()

    def cam(q):
        return client.post("/api/gradcam", data={"text": q, "index": "1"}).json()["grid"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        s_futs = [pool.submit(search, q) for q in queries]
        c_futs = [pool.submit(cam, q) for q in queries[:4]]
        parallel = [f.result() for f in s_futs]
        parallel_cams = [f.result() for f in c_futs]
    assert json.dumps(parallel) == json.dumps(sequential)
    for a, b in zip(parallel_cams, cams, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))


def test_build_app_without_a_model_points_at_the_main_job(tmp_path, monkeypatch):
    from albef.cli.serve import build_app, parser

    monkeypatch.chdir(tmp_path)  # no runs/main here
    with pytest.raises(SystemExit, match="run the main job first"):
        build_app(parser().parse_args([]))


def test_build_app_from_a_saved_model(tmp_path, gallery, monkeypatch):
    from albef.checkpoints.pretrained import save_pretrained
    from albef.cli.serve import build_app, parser

    monkeypatch.chdir(tmp_path)

    cfg = get_preset("albef-tiny")
    save_pretrained(ALBEF(cfg, mlm_head=False), tmp_path / "model")
    base = ["--model", str(tmp_path / "model"), "--images", str(gallery)]
    base += ["--cache-dir", str(tmp_path / "c"), "--no-progress"]
    with pytest.raises(SystemExit, match="no VQA model"):
        build_app(parser().parse_args([*base, "--vqa-model", str(tmp_path / "none")]))
    answers = tmp_path / "answers.json"
    answers.write_text('["red", "blue"]')
    # a retrieval model as the VQA model: refused at start, not with a 500 per question
    not_vqa = parser().parse_args([*base, "--vqa-model", str(tmp_path / "model"), "--answers", str(answers)])
    with pytest.raises(SystemExit, match="holds no VQA model .*--vqa-model needs one"):
        build_app(not_vqa)
    args_ok = parser().parse_args(base)
    c = TestClient(build_app(args_ok), base_url=BASE)
    assert c.get("/api/info").json()["images"] == len(COLOURS)


def test_an_unwritable_cache_does_not_stop_the_server(pipe, gallery, tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    index = GalleryIndex.build(pipe, gallery, blocker / "cache", model_id="m1", progress=False)
    assert len(index) == len(COLOURS) and not index.from_cache
    assert "could not write the index cache" in caplog.text
