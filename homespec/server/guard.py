"""What keeps a slow or hostile HTTP client from holding the server (DESIGN §8, RELIABILITY.md).

- ``TimedH11``: uvicorn's h11 protocol with a deadline on request headers. A connection that has not sent a whole
  request head within ``read_timeout_s`` of connecting (or of its last response, on keep-alive) is closed; uvicorn
  itself only times out idle keep-alive connections, and a client that trickles a header byte at a time would hold
  a connection (and a file descriptor) for ever.
- ``BodyLimit``: ASGI middleware that reads the body before the app sees it, up to ``max_bytes`` (413 past it,
  with ``Content-Length`` or chunked) and within ``read_timeout_s`` (408 after it).
- The cap on connections open at once is uvicorn's ``limit_concurrency`` (``homespec serve --max-connections``): past
  it a new request gets 503 at once instead of a socket.

Errors leave in OpenAI's shape. This module knows HTTP and timers, never the engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from homespec.config import DEFAULT_READ_TIMEOUT_S
from homespec.server.openai import ApiError


def timed_h11(read_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class whose connections must send each request head within ``read_timeout_s``."""

    class TimedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._cancel_head()  # a request head arrived: the body's deadline is BodyLimit's
            else:
                self._await_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(read_timeout_s, self._too_slow)

        def _cancel_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _too_slow(self) -> None:
            self._head_timer = None
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

    return TimedH11


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 in OpenAI's shape before the app sees it,
    whether it says its length (``Content-Length``) or not (chunked); one not complete within ``read_timeout_s``
    gets a 408. The body is read here and handed on; what the client sends after it (a disconnect) goes to the app
    as usual."""

    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return None
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _error(scope, send, 413, f"request body over {self.max_bytes} bytes", "body_too_large")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.read_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                why = f"the request body did not arrive within {self.read_timeout_s:g} s"
                return await _error(scope, send, 408, why, "request_timeout")
            if message["type"] != "http.request":  # the client left before its body was complete
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _error(scope, send, 413, f"request body over {self.max_bytes} bytes", "body_too_large")
        body, delivered = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)


async def _error(scope: dict[str, Any], send: Any, status: int, message: str, code: str) -> None:
    error = ApiError(status, message, code=code)
    await JSONResponse(error.body(), status_code=status, headers={"connection": "close"})(scope, _nothing, send)


async def _nothing() -> dict[str, Any]:
    return {"type": "http.disconnect"}
