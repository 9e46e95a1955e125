"""ASGI middleware in front of every endpoint of ``moesaic serve``: the API key (``/v1/*`` only), the body
limit (413 past ``body_limit`` bytes, read before the application sees the body), strict UTF-8 of the
body (400), and the request counter of ``/metrics``. Its answers are in OpenAI's error shape."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moesaic.serve.metrics import ServeMetrics
from moesaic.serve.protocol import error_body

#: A refused body up to this many times the limit is read to its end before the 413 (see ``Guard._drain``).
DRAIN_FACTOR = 16
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, body_limit: int, metrics: ServeMetrics):
        self.app, self.api_key, self.body_limit, self.metrics = app, api_key, body_limit, metrics
        self.begin_shutdown: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def counted(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg["status"])
            await send(msg)

        try:
            await self._guarded(scope, receive, counted, path)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode()):
                await send_json(send, 401, error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                                      "authentication_error", None, "invalid_api_key"),
                                [(b"www-authenticate", b"Bearer")])
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.body_limit):
            if declared.isdigit() and int(declared) <= DRAIN_FACTOR * self.body_limit:
                await self._drain(receive)
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.body_limit:
                if msg.get("more_body", False):
                    await self._drain(receive)
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        try:
            body.decode("utf-8")  # strict: Python's JSON parser would let UTF-8-encoded surrogates through
        except UnicodeDecodeError as e:
            await send_json(send, 400, error_body(f"body: not valid UTF-8 (byte {e.start})", "invalid_request_error",
                                                  None, "invalid_utf8"))
            return

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the rest of a refused body (up to ``DRAIN_FACTOR`` times the limit) before answering,
        so that closing the connection does not reset it under a client still sending (which would lose the
        413: "lingering close", as nginx does)."""
        left = DRAIN_FACTOR * self.body_limit
        while left > 0:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            left -= len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def _too_large(self, send: Send) -> None:
        await send_json(send, 413, error_body(f"request body over the limit of {self.body_limit} bytes "
                                              "(the server's --body-limit)", "invalid_request_error", None,
                                              "body_too_large"), [(b"connection", b"close")])
