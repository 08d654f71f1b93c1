"""The guard's rules around an ASGI application (the Dagster webserver): a request they refuse never reaches
it, and every answer carries the security headers.

A refused HTTP request gets its status and reason as text; a refused WebSocket is closed before it is
accepted (the client sees HTTP 403). Refusals are logged with the client's address, the request line and
the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from em_platform.web_guard.rules import SECURITY_HEADERS, Policy, Refusal, Request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("em_platform.web_guard")
_HEADERS = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS]


def request_of(scope: Scope) -> Request:
    return Request(
        method=scope.get("method", "GET").upper(),
        path=scope.get("path", "/"),
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])),
        websocket=scope["type"] == "websocket",
    )


class Guarded:
    """``app`` behind ``policy``."""

    def __init__(self, app: ASGIApp, policy: Policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)  # lifespan
        request = request_of(scope)
        refusal = self.policy.judge(request)
        if refusal is not None:
            client = scope.get("client") or ("?", 0)
            log.warning(
                "refused %s %s %s from %s: %s",
                "WebSocket" if request.websocket else request.method,
                request.path,
                refusal.status,
                client[0],
                refusal.reason,
            )
            if request.websocket:
                return await _close(receive, send)
            return await _refuse(send, refusal)
        await self.app(scope, receive, _with_headers(send))


def _with_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [(k, v) for k, v in _HEADERS if k not in present or k == b"content-security-policy"]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


async def _refuse(send: Send, refusal: Refusal) -> None:
    body = (refusal.reason + "\n").encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers + _HEADERS})
    await send({"type": "http.response.body", "body": body})


async def _close(receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":  # closed before accept: the handshake is answered 403
        await send({"type": "websocket.close", "code": 1008})
