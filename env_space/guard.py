"""ASGI gate in front of the whole app: bearer-token auth, request-size limit, session-cap refusal, request counting.

Owns `Guard`. It is plain ASGI (not Starlette's BaseHTTPMiddleware) so it sees WebSocket handshakes too and can
refuse them *before* OpenEnv accepts the socket:
  * auth: with an API key configured every path except `/health` needs `Authorization: Bearer <key>` (HTTP Basic
    with the key as password is accepted too, so a browser can open the Gradio page); 401 otherwise;
  * size: an HTTP body over the limit is a 413, whether announced by Content-Length or streamed chunked;
    WebSocket frames are capped by uvicorn's `ws_max_size`, set to the same limit in `__main__`;
  * capacity: a WebSocket that would open a new OpenEnv session while the cap is reached gets an HTTP 429 handshake
    refusal. The cap itself is OpenEnv's (`ConcurrencyConfig.max_concurrent_envs`); this only makes the refusal a
    clear status instead of an accepted socket that then carries a CAPACITY_REACHED error frame (which still covers
    the race of two handshakes for the last slot).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from env_space.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
SESSION_PATHS = frozenset({"/ws", "/mcp"})  # WebSocket routes on which OpenEnv creates a session per connection
_AUTH_CHALLENGE = (b"www-authenticate", b'Bearer realm="dws", Basic realm="dws"')


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str | None,
        max_body_bytes: int,
        capacity: Callable[[], tuple[int, int]],
        metrics: Metrics,
        open_paths: Iterable[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self._key = api_key.encode("utf-8") if api_key else None
        self._max_body = max_body_bytes
        self._capacity = capacity
        self._metrics = metrics
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self._metrics.record_request()
        path = scope.get("path", "")
        if self._key is not None and path not in self._open and not self._authorized(scope):
            await _refuse(scope, receive, send, 401,
                          "missing or invalid API key: send 'Authorization: Bearer <DWS_API_KEY>'",
                          extra_headers=[_AUTH_CHALLENGE])
            return
        if kind == "websocket":
            if path in SESSION_PATHS and not _attaches(scope):
                active, cap = self._capacity()
                if active >= cap:
                    await _refuse(scope, receive, send, 429,
                                  f"session cap reached ({active}/{cap} sessions active); retry later",
                                  extra_headers=[(b"retry-after", b"5")])
                    return
            await self.app(scope, self._screening(receive, send, path), send)
            return
        await self._limited(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self._key is not None
        value = b""
        for name, v in scope.get("headers", ()):
            if name == b"authorization":
                value = v
                break
        scheme, _, cred = value.partition(b" ")
        scheme = scheme.lower()
        if scheme == b"bearer":
            token = cred.strip()
        elif scheme == b"basic":
            try:
                token = base64.b64decode(cred.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        else:
            return False
        # Constant-time: a plain == would leak the key's prefix through response timing.
        return hmac.compare_digest(token, self._key)

    def _screening(self, receive: Receive, send: Send, path: str) -> Receive:
        """Count WebSocket messages, and answer frames OpenEnv's session loops would die on.

        Hazard: OpenEnv 0.10 calls `.get` on the parsed frame and `receive_text()` outside its per-message error
        handling, catches only `JSONDecodeError` from its parser, and its validation-error reply cannot encode a
        lone surrogate it echoes back; so a JSON frame that is not an object (`null`, `[1]`), a binary frame, a
        10 000-digit number, nesting 5 000 deep or a string escape like "\\ud800" kills the whole session. Such
        frames get an error reply here and never reach OpenEnv; the session continues. Safe to send from inside
        `receive`: OpenEnv's loop never sends while it waits for the next message.
        """
        reply = _FRAME_ERRORS.get(path)

        async def screened() -> Message:
            while True:
                msg = await receive()
                if msg["type"] != "websocket.receive":
                    return msg
                self._metrics.record_request()
                if reply is None or not _breaks_openenv(msg):
                    return msg
                await send({"type": "websocket.send", "text": reply})

        return screened

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        length: bytes | None = None
        chunked = False
        for name, v in scope.get("headers", ()):
            if name == b"content-length":
                length = v
            elif name == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        if length is not None and not chunked:
            try:
                n = int(length)
            except ValueError:
                n = self._max_body + 1  # unparsable: treat as too large rather than trust it
            if n > self._max_body:
                await _refuse(scope, receive, send, 413, f"request body over {self._max_body} bytes")
                return
            await self.app(scope, receive, send)  # the HTTP parser holds the body to exactly Content-Length
            return
        if not chunked:
            await self.app(scope, receive, send)
            return
        # Chunked: no length up front, so read (at most the limit) before the app sees a byte.
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self._max_body:
                await _refuse(scope, receive, send, 413, f"request body over {self._max_body} bytes")
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_FRAME_ERRORS = {
    "/ws": json.dumps({"type": "error", "data": {
        "message": 'each message must be a JSON object in a UTF-8 text frame, e.g. {"type": "step", "data": {...}}',
        "code": "INVALID_JSON"}}),
    "/mcp": json.dumps({"jsonrpc": "2.0", "id": None, "error": {
        "code": -32600, "message": "Invalid Request: each message must be a JSON-RPC object in a UTF-8 text frame"}}),
}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _breaks_openenv(msg: Message) -> bool:
    text = msg.get("text")
    if text is None:
        return True  # binary frame
    try:
        value = json.loads(text)  # a few microseconds for a normal frame
    except json.JSONDecodeError:
        return False  # not JSON: OpenEnv answers INVALID_JSON itself and carries on
    except (ValueError, RecursionError):
        return True  # e.g. an integer beyond Python's digit limit, or nesting deeper than the parser allows
    if not isinstance(value, dict):
        return True
    return bool(_SURROGATE_ESCAPE.search(text)) and _has_lone_surrogate(value)


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]  # iterative: the parsed value may be nested as deep as the parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _attaches(scope: Scope) -> bool:
    """Whether the handshake attaches to an existing session (OpenEnv's `?session_id=`), creating none."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return bool(query.get("session_id"))


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                  *, extra_headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": message}).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    msg = await receive()  # the ASGI handshake starts with websocket.connect; answer only after it
    if msg["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:  # server without the denial-response extension: close the handshake (1008 policy, 1013 try later)
        await send({"type": "websocket.close", "code": 1013 if status == 429 else 1008, "reason": message[:120]})
