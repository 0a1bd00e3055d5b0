"""Bounded HTTP requests, shared by the registry service and the inference worker.

``BodyLimit`` is a plain ASGI middleware that runs before any route: it checks authorization (when the
app gives it a check) before a single body byte is read, refuses a declared ``Content-Length`` over the
cap unread, then reads the body stream itself (chunked bodies included) and stops at the cap, and gives
up on a body that does not arrive within the read timeout. Only a complete, in-bounds body is handed to
the app, so no parser ever sees more than the cap. Every refusal is a JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import Headers

log = logging.getLogger("aas.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Authorize = Callable[[Headers, str, str], JSONResponse | None]  # (headers, method, path) → refusal or None


class ErrorBody(BaseModel):
    """Every error answer of both services."""

    error: str


STATUS_TEXT = {
    400: "malformed request", 401: "missing or wrong bearer token", 403: "writes are disabled on this service",
    404: "no such model, version or alias", 408: "the request body did not arrive in time",
    409: "conflicts with the registry's state", 413: "request body or values over the limit",
    422: "invalid request", 503: "a backing service (Redis, object store) is unavailable, or no model is loaded",
}  # fmt: skip


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for these error statuses, each a JSON ErrorBody."""
    return {code: {"model": ErrorBody, "description": STATUS_TEXT.get(code, "error")} for code in codes}


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodyLimit:
    """Authorize, then read at most `max_bytes` of the body within `read_timeout_s`, then call the app."""

    def __init__(self, app: ASGIApp, *, max_bytes: int | Callable[[], int], read_timeout_s: float,
                 authorize: Authorize | None = None) -> None:
        self.app, self.max_bytes, self.read_timeout_s, self.authorize = app, max_bytes, read_timeout_s, authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.authorize is not None:
            refused = self.authorize(headers, scope["method"], scope["path"])
            if refused is not None:
                await refused(scope, receive, send)  # type: ignore[arg-type]
                return
        cap = self.max_bytes() if callable(self.max_bytes) else self.max_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isascii() or not declared.isdigit()):
            await _close_with(json_error(400, f"malformed Content-Length {declared[:40]!r}"), scope, receive, send)
            return
        if declared is not None and int(declared) > cap:
            await _close_with(_too_large(int(declared), cap), scope, receive, send)
            return
        body = await self._read(receive, cap)
        if isinstance(body, JSONResponse):
            await _close_with(body, scope, receive, send)
            return
        if body is None:
            return  # the client went away
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, cap: int) -> bytes | JSONResponse | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                return json_error(408, f"the request body did not arrive within {self.read_timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:  # stop reading here: the rest of the stream is never taken in
                return _too_large(size, cap, at_least=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, cap: int, *, at_least: bool = False) -> JSONResponse:
    more = "more than " if at_least else ""
    return json_error(413, f"request body of {more}{size} bytes exceeds the limit of {cap}; send less per request")


async def _close_with(resp: JSONResponse, scope: Scope, receive: Receive, send: Send) -> None:
    # The body was not (fully) read: ask the server to close the connection rather than reuse it.
    resp.headers["connection"] = "close"
    log.info("refused %s %s: %s %s", scope.get("method"), scope.get("path"), resp.status_code, resp.body[:200])
    await resp(scope, receive, send)  # type: ignore[arg-type]


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications

    return replay


def add_json_errors(app: FastAPI) -> None:
    """A bug answers JSON 500 without details (never a plain-text page, never a traceback to the client)."""

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return json_error(500, f"internal error ({type(exc).__name__}); see the service's log")
