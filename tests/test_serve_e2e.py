"""End to end: a real server on 127.0.0.1, driven in headless Chromium with Playwright.

Needs Debian's ``chromium`` (``scripts/setup.sh`` installs it when it can; CI does). The
screenshot is kept in ``test-artifacts/serve_e2e.png`` (or ``$ALBEF_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
ARTIFACTS = Path(os.environ.get("ALBEF_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, tiny_config):
    from albef.api import Pipeline, VQAPipeline
    from albef.models.albef import ALBEF
    from albef.models.tasks import ALBEFForVQA
    from albef.search.gallery import GalleryIndex
    from albef.serve.app import create_app

    folder = tmp_path / "images"
    folder.mkdir()
    for i, c in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 220, 20)]):
        Image.new("RGB", (48, 48), c).save(folder / f"colour{i}.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    pipe = Pipeline(ALBEF(tiny_config, mlm_head=False), device="cpu")
    index = GalleryIndex.build(pipe, folder, tmp_path / "cache", progress=False)
    vqa = VQAPipeline(ALBEFForVQA(tiny_config), device="cpu", answer_list=["red", "green", "blue"], k=3)
    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(pipe, index, vqa, "tiny"), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", tmp_path
    srv.should_exit = True
    thread.join(timeout=10)


def test_search_overlay_and_bad_upload_in_a_browser(server):
    url, tmp = server
    bad = tmp / "not-an-image.png"
    bad.write_text("this is text, not a picture")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)
            sync_api.expect(page.locator("#info")).to_contain_text("4 images indexed")
            sync_api.expect(page.locator("#info")).to_contain_text("corrupt.jpg")  # the unreadable file is named
            page.fill("#query", "a red square")
            page.click("#search-btn")
            hits = page.locator(".hit")
            sync_api.expect(hits).to_have_count(4)
            sync_api.expect(hits.first).to_contain_text("ITM")
            hits.first.locator("button.where").click()
            overlay = page.locator("#overlay")
            sync_api.expect(overlay).to_be_visible()
            assert overlay.get_attribute("src").startswith("data:image/png;base64,")
            assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0
            # an empty query: the server's message on the page
            page.fill("#query", "")
            page.click("#search-btn")
            sync_api.expect(page.locator("#error")).to_contain_text("query is empty")
            # a bad upload: the message names the file, the page keeps working
            page.set_input_files("#upload", str(bad))
            page.fill("#caption", "a red square")
            page.click("#match-btn")
            sync_api.expect(page.locator("#error")).to_contain_text("not-an-image.png is not an image")
            page.screenshot(path=str(ARTIFACTS / "serve_e2e.png"), full_page=True)
            page.set_input_files("#upload", [])
            hits.first.locator("img").click()
            page.click("#match-btn")
            sync_api.expect(page.locator("#match-out")).to_contain_text("match probability")
            sync_api.expect(page.locator("#error")).to_be_hidden()
            page.fill("#question", "what color is it?")
            page.click("#ask-btn")
            sync_api.expect(page.locator("#ask-out")).to_contain_text("answer:")
        finally:
            browser.close()
    assert (ARTIFACTS / "serve_e2e.png").stat().st_size > 1000
