"""The ASGI middleware in front of ``albef serve``: which hosts it answers, which origins may post to
it, and how large a request body may be.

* **Host**: a page on another site can make its own name resolve to 127.0.0.1 (DNS rebinding) and
  then read this server as if it were its own origin; the browser still sends that name in
  ``Host``, so only the configured names are answered (``localhost``, ``127.0.0.1`` and ``[::1]``,
  on any port, plus ``albef serve --allowed-host NAME``; ``*`` turns the check off). Others get
  421 with a JSON error.
* **Origin**: a request that can change state (anything but GET/HEAD/OPTIONS) that carries an
  ``Origin`` must come from this server's own origin (the same host and port as ``Host``), else
  403. Requests without ``Origin`` (curl, scripts) are allowed. No CORS header is ever sent.
* **Body size**: a ``Content-Length`` over the limit is refused before anything is read; a body
  without one (chunked) is counted as it arrives and refused as soon as it passes the limit. Both
  answer 413 naming the limit and the size seen.

Example:
    >>> split_host("LocalHost:8000"), split_host("[::1]"), normalise_host("::1")
    (('localhost', 8000), ('[::1]', None), '[::1]')
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from albef.serve.images import format_bytes

log = logging.getLogger("albef.serve")
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "[::1]")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def split_host(value: str) -> tuple[str, int | None]:
    """A ``Host`` value as (lower-case name, port or None); ``ValueError`` if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"unclosed IPv6 address in {value!r}")
        name, rest = value[: end + 1], value[end + 1 :]
    else:
        name, sep, port = value.partition(":")
        rest = sep + port
    port: int | None = None
    if rest:
        digits = rest[1:]
        if not rest.startswith(":") or not (digits.isascii() and digits.isdigit()) or not 0 < int(digits) < 65536:
            raise ValueError(f"bad port in {value!r}")
        port = int(digits)
    name = name if name.startswith("[") else name.rstrip(".")  # "localhost." is localhost
    if not name or any(c in name for c in "/\\@ \t?#"):
        raise ValueError(f"bad host name {value!r}")
    return name, port


def normalise_host(name: str) -> str:
    """An allowed-host entry as :func:`split_host` names it (a bare IPv6 address gets brackets;
    a port, if given, is dropped: any port is answered)."""
    name = name.strip().lower()
    if name == "*":
        return name
    if name.count(":") > 1 and not name.startswith("["):
        name = f"[{name}]"
    return split_host(name)[0]


class RequestGuard:
    """Pure ASGI middleware: Host allow-list, same-origin POSTs, body size limit (module docstring).

    ``body_limit`` is called per request and returns (the limit in bytes, how to describe it), so
    a limit read from a module constant follows the constant."""

    def __init__(self, app, allowed_hosts: Iterable[str], body_limit: Callable[[], tuple[int, str]]):
        self.app = app
        self.allowed = {normalise_host(h) for h in allowed_hosts}
        self.body_limit = body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        method = scope.get("method", "GET").upper()
        # Host
        raw_host = headers.get("host")
        try:
            host = split_host(raw_host) if raw_host is not None else None
        except ValueError:
            host = None
        if host is None or ("*" not in self.allowed and host[0] not in self.allowed):
            names, given = ", ".join(sorted(self.allowed)), (raw_host or "")[:100]
            return await _reply(
                scope,
                receive,
                send,
                421,
                f"this server answers only to {names} (the request's Host was {given!r}); "
                "start it with --allowed-host NAME to answer to another name",
            )
        # Origin, on requests that can change state
        origin = headers.get("origin")
        if origin is not None and method not in SAFE_METHODS and not same_origin(origin, host, scope):
            return await _reply(
                scope,
                receive,
                send,
                403,
                f"cross-origin {method} refused: the request comes from {origin[:100]!r}, not from "
                "this server's own page",
            )
        # body size
        limit, what = self.body_limit()
        declared = headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            return await _reply(
                scope,
                receive,
                send,
                413,
                f"the request body is {format_bytes(int(declared))} (its Content-Length); the limit is {what}",
            )
        seen = 0
        too_large: str | None = None  # the 413 message, once the body has passed the limit
        replaced = False  # the app's own answer (FastAPI's 400 "error parsing the body") is dropped
        started = False  # the app began its answer before the body was too large: leave it alone

        async def counted_receive():
            nonlocal seen, too_large
            if too_large is not None:
                raise BodyTooLarge(too_large)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    scope["albef.body_too_large"] = True  # the app's handlers need not log their side of it
                    too_large = (
                        f"the request body passed the limit of {what}: {format_bytes(seen)} had arrived "
                        "when the server stopped reading it"
                    )
                    raise BodyTooLarge(too_large)
            return message

        async def guarded_send(message):
            nonlocal replaced, started
            if too_large is None or started:
                started = started or message["type"] == "http.response.start"
                return await send(message)
            if message["type"] == "http.response.start" and not replaced:
                replaced = True
                await _reply(scope, receive, send, 413, too_large)
            # the app's answer to the interrupted body is not sent

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if not replaced and not started:
                await _reply(scope, receive, send, 413, too_large or "the request body is too large")


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes the limit; whatever the app answers then
    (FastAPI turns it into a 400 "error parsing the body") is replaced by the guard's 413."""


def same_origin(origin: str, host: tuple[str, int | None], scope) -> bool:
    """Whether ``Origin`` names the host and port the request was sent to (its ``Host``)."""
    try:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            return False
        name, port = split_host(parts.netloc)
    except ValueError:  # "null" (sandboxed frames, file://), a malformed value
        return False
    if name != host[0]:
        return False
    if port is None and host[1] is None:  # both on their scheme's default port (maybe behind a TLS proxy)
        return True
    scheme = scope.get("scheme", "http")
    own = host[1] if host[1] is not None else DEFAULT_PORTS.get(scheme, 80)
    return parts.scheme == scheme and (port if port is not None else DEFAULT_PORTS[parts.scheme]) == own


async def _reply(scope, receive, send, status: int, message: str, close: bool = True) -> None:
    log.warning("%s %s: %d %s", scope.get("method"), scope.get("path"), status, message)
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the body (or its rest) is not read: the connection is not reused
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
