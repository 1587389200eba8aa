"""Bounded image decoding for ``albef serve``: uploads are checked from their header, decoded a
few at a time, at the resolution the model and the page use, and their buffers handed back.

Why these bounds: the model sees an image resized to its input size (64-384 px) and the page shows
the Grad-CAM overlay at most 384 px wide, so nothing needs more than ``target`` = max(input size,
384) pixels a side. A file's pixel count is read from its header (``Image.open`` is lazy) and
refused above the pixel limit before anything is decoded; a JPEG is then decoded at 1/2-1/8 scale
(``draft``) and other formats, which PIL can only decode whole, are box-reduced right after decoding
so the image a request keeps while it waits for the model is at most 2 x ``target`` a side (about
2.4 MB). A full decode costs up to 4 bytes a pixel (PIL stores RGB as 4 bytes), so with the
default 16 Mpx limit and 2 decodes in flight a burst of uploads holds at most ~128 MB of decoded
pixels at once, whatever its size. glibc keeps freed heap pages of large buffers; the last decode
of a burst gives them back (``malloc_trim``).

Example:
    >>> dec = ImageDecoder(max_decodes=2, target=384)
    >>> import io; buf = io.BytesIO(); Image.new("RGB", (2000, 1000), "red").save(buf, "PNG")
    >>> dec.decode(buf, "red.png", max_pixels=16_000_000).size  # reduced, at least 384 a side
    (400, 500)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from PIL import Image

from albef.heap import release_freed_memory

log = logging.getLogger("albef.serve")
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
TRIM_AFTER_PIXELS = 1_000_000  # a decode this large (>= ~4 MB) is worth a malloc_trim once the burst ends


class BadInput(Exception):
    """A request the server refuses; the app answers ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def format_bytes(n: int) -> str:
    """``16 MB``, ``16.1 MB``, ``64 KB``, ``163 bytes``."""
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f}".rstrip("0").rstrip(".") + " " + unit
    return f"{n:,} bytes"


def shrink(img: Image.Image, target: int) -> Image.Image:
    """Box-reduce each side by a whole factor so it stays in [target, 2 x target) (sides shorter
    than ``target`` are kept); the model squashes the image to a square anyway, the page rescales
    to the original aspect."""
    fx, fy = max(1, img.width // target), max(1, img.height // target)
    if fx == 1 and fy == 1:
        return img
    try:
        return img.reduce((fx, fy))
    except ValueError:  # modes reduce does not take ("1", "P", "I;16")
        return img.convert("RGB").reduce((fx, fy))


class ImageDecoder:
    """Decodes images at most ``max_decodes`` at a time (a burst waits for a slot, ``timeout`` s at
    most), on ``max_decodes`` threads of its own: glibc gives each thread that allocates a heap
    arena of its own and keeps the pages a decode freed there, so decodes spread over the request
    threads would leave a decode's worth of pages in each of up to 8 x cores arenas; on a few
    threads of their own they re-use the same pages, which the last decode of a burst trims."""

    def __init__(self, max_decodes: int = 2, target: int = 384, timeout: float = 60.0):
        if max_decodes < 1:
            raise ValueError(f"max_decodes must be at least 1, got {max_decodes}")
        self.max_decodes, self.target, self.timeout = max_decodes, target, timeout
        self._slots = threading.BoundedSemaphore(max_decodes)
        self._pool = ThreadPoolExecutor(max_workers=max_decodes, thread_name_prefix="albef-decode")
        self._state = threading.Lock()
        self._in_flight = 0
        self._trim_pending = False
        self.peak_in_flight = 0  # for tests and logs

    def decode(
        self, fp: IO[bytes], name: str, max_pixels: int | None, formats: Sequence[str] | None = UPLOAD_FORMATS
    ) -> Image.Image:
        """An RGB image of ``fp``, at most 2 x ``target`` a side, or a :class:`BadInput`."""
        if not self._slots.acquire(timeout=self.timeout):
            raise BadInput("the server is busy decoding other images; try again in a moment", 503)
        try:  # a slot is held, so a worker is free: the job does not queue
            return self._pool.submit(self._run, fp, name, max_pixels, formats).result()
        finally:
            self._slots.release()

    def _run(self, fp, name, max_pixels, formats) -> Image.Image:
        with self._state:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        big = False
        try:
            img, big = self._decode(fp, name, max_pixels, formats)  # its full-size buffers are freed here
            return img
        finally:
            with self._state:
                self._in_flight -= 1
                self._trim_pending |= big
                trim = self._trim_pending and self._in_flight == 0
                if trim:
                    self._trim_pending = False
            if trim:
                release_freed_memory()

    def _decode(self, fp, name, max_pixels, formats) -> tuple[Image.Image, bool]:
        try:
            src = Image.open(fp, formats=formats)
        except Image.DecompressionBombError as e:  # PIL's own guard, far above ours
            raise BadInput(
                f"{name} has more than {max_pixels or Image.MAX_IMAGE_PIXELS:,} pixels, the limit "
                "(scale it down first)",
                413,
            ) from e
        except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is a bad upload
            raise BadInput(
                f"{name} is not an image this server can read ({type(e).__name__}); "
                "upload a PNG, JPEG, GIF, BMP or WebP file"
            ) from e
        with src:
            w, h = src.size
            if max_pixels is not None and w * h > max_pixels:
                raise BadInput(
                    f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,} pixels (scale it down first)",
                    413,
                )
            try:
                if src.format in ("JPEG", "MPO") and min(w, h) >= 2 * self.target:
                    src.draft(None, (self.target, self.target))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale
                src.load()
                big = src.width * src.height >= TRIM_AFTER_PIXELS
                small = shrink(src, self.target)
                out = small.convert("RGB")  # a copy even when already RGB: nothing refers to src after this
                del small
                out.info["original_size"] = (w, h)  # the page shows the overlay at the original's aspect
            except BadInput:
                raise
            except MemoryError as e:
                raise BadInput(f"{name}: the server is out of memory decoding it; try a smaller image", 503) from e
            except Exception as e:  # noqa: BLE001 - truncated or corrupt data, decoder errors
                raise BadInput(
                    f"{name} is not an image this server can read ({type(e).__name__}); "
                    "upload a PNG, JPEG, GIF, BMP or WebP file"
                ) from e
        return out, big
