"""``albef serve`` under hostile load, against a real server (uvicorn in a subprocess on 127.0.0.1):
the body limit while the body streams, and memory during and after a burst of image bombs.

Traffic goes only to 127.0.0.1 on a free port, bounded: a handful of requests here, 32 in the burst.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)"),
    pytest.mark.slow,
]  # every test needs the module's server (about 7 s to start)

SERVER = """
import sys
from pathlib import Path
import uvicorn
from PIL import Image
from albef.api import Pipeline
from albef.config import get_preset
from albef.models.albef import ALBEF
from albef.serve.app import create_app
from albef.search.gallery import GalleryIndex

folder, port = Path(sys.argv[1]), int(sys.argv[2])
folder.mkdir(parents=True, exist_ok=True)
for i, c in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220)]):
    Image.new("RGB", (48, 48), c).save(folder / f"colour{i}.png")
pipe = Pipeline(ALBEF(get_preset("albef-tiny"), mlm_head=False), device="cpu")
index = GalleryIndex.build(pipe, folder, None, progress=False)
uvicorn.run(create_app(pipe, index, None, "tiny"), host="127.0.0.1", port=port, log_level="warning")
"""
MB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Bytes of ``field`` (VmRSS, VmHWM) in /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _png(size, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict[str, str], filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "albef-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(port: int, path: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}"), time.monotonic() - t0
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-limits")
    script = tmp / "serve_tiny.py"
    script.write_text(SERVER)
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp / "images"), str(port)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"the server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/api/info")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _raw_exchange(port: int, head: bytes, chunks=(), chunked: bool = False, limit_s: float = 20):
    """Send ``head``, then ``chunks`` until the server answers (a thread reads while this one
    sends); (bytes of body sent, status, JSON answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=limit_s)
    answer, answered = bytearray(), threading.Event()

    def read():
        try:
            while got := s.recv(65536):
                answer.extend(got)
                answered.set()
        except OSError:
            pass
        finally:
            answered.set()

    reader = threading.Thread(target=read, daemon=True)
    sent = 0
    try:
        s.sendall(head)
        reader.start()
        for ch in chunks:
            if answered.is_set():
                break
            try:
                s.sendall((b"%x\r\n" % len(ch) + ch + b"\r\n") if chunked else ch)
            except OSError:  # the server answered and closed the connection
                break
            sent += len(ch)
        reader.join(limit_s)
    finally:
        s.close()
    head_, _, body = bytes(answer).partition(b"\r\n\r\n")
    assert head_, "no answer"
    return sent, int(head_.split()[1]), json.loads(body)


def test_a_declared_oversized_body_is_refused_before_it_is_sent(server):
    port, _ = server
    head = (
        f"POST /api/match HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
        f"boundary=x\r\nContent-Length: {300 * MB}\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    sent, status, body = _raw_exchange(port, head)  # not one byte of the body is sent
    assert status == 413 and time.monotonic() - t0 < 5
    assert body["error"].startswith("the request body is 300 MB (its Content-Length); the limit is 16.1 MB")


def test_a_chunked_oversized_body_is_cut_off_once_past_the_limit(server):
    port, _ = server
    head = (
        f"POST /api/match HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
        "boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    first = b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n\r\n'
    chunks = [first] + [b"\0" * 65536] * (300 * 16)  # 300 MB on offer
    sent, status, body = _raw_exchange(port, head, chunks, chunked=True)
    assert status == 413
    assert "the request body passed the limit of 16.1 MB" in body["error"]
    seen = float(body["error"].split(": ")[-1].split(" MB")[0])
    assert 16.1 <= seen <= 16.5, body  # what had arrived when it stopped: just past the limit
    assert sent < 100 * MB  # the server answered long before the 300 MB were through


def test_a_burst_of_image_bombs_stays_within_its_memory_budget_and_gives_it_back(server):
    """32 concurrent uploads: 24 PNGs of 4000x3999 (16.0 Mpx, just under the 16 Mpx limit, 56 KB
    each) and 8 of 6000x6000 (36 Mpx, over it). Before the limits, each was decoded at once at
    4 bytes a pixel (64-144 MB apiece, ~2.6 GB for this burst) and kept by its request.

    Budget for the peak: 2 decodes in flight x 64 MB (16 Mpx x 4 bytes) x 1.5 (decoder buffers, the
    reduced copy) = 192 MB, plus 32 requests x 1 MB (a spooled upload, parser and thread) and 64 MB
    of slack for the allocator = 288 MB over the baseline. After the burst, RSS must be back within
    64 MB (one decode's buffer) of the baseline: the buffers are freed and glibc's pages trimmed."""
    port, pid = server
    under, over = _png((4000, 3999)), _png((6000, 6000), (20, 90, 200))
    small = _png((40, 40))
    for _ in range(3):  # warm up: threads, the model's first passes, one small decode
        status, _, _ = _post(port, "/api/match", *_multipart({"text": "a red square"}, "s.png", small))
        assert status == 200
    time.sleep(0.5)
    baseline = _rss(pid)
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        hwm = True
    except OSError:
        hwm = False

    peak, stop = [baseline], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak.append(_rss(pid))
            except (OSError, KeyError):
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    jobs = [("under.png", under)] * 24 + [("over.png", over)] * 8
    jobs = jobs[::4] + jobs[1::4] + jobs[2::4] + jobs[3::4]  # mix the refused ones in
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda j: (j[0], *_post(port, "/api/match", *_multipart({"text": "red"}, *j))), jobs))
    burst_s = time.monotonic() - t0
    stop.set()
    sampler.join()
    peak_rss = max(max(peak), _rss(pid, "VmHWM") if hwm else 0)
    after = baseline
    for _ in range(40):  # settle: the last request's objects are freed as its thread finishes
        time.sleep(0.1)
        after = _rss(pid)
        if after <= baseline + 32 * MB:
            break

    print(
        f"\nbaseline {baseline / MB:.0f} MB, peak {peak_rss / MB:.0f} MB (+{(peak_rss - baseline) / MB:.0f}), "
        f"after {after / MB:.0f} MB (+{(after - baseline) / MB:.0f}); burst {burst_s:.1f} s"
    )
    for name, status, body, _ in results:
        if name == "under.png":
            assert status == 200, body
        else:
            assert status == 413 and "the limit is 16,000,000 pixels" in body["error"], body
    assert max(r[3] for r in results if r[0] == "over.png") < 30  # refused from the header, even behind the queue
    assert peak_rss - baseline < 288 * MB, f"peak {(peak_rss - baseline) / MB:.0f} MB over the baseline"
    assert after - baseline < 64 * MB, f"{(after - baseline) / MB:.0f} MB still held after the burst"
