"""The ASGI application: HTTP and WebSocket in front of the engine.

A bare ASGI callable rather than a framework: the service has eight routes, and at tens of
thousands of decisions a second the framework's per-request cost is the largest part of the
server's own (measured in ``docs/decision-service.md``: Starlette and FastAPI add 40-110 µs a
request on this machine). It runs under any ASGI server; ``cogbert decide serve`` uses uvicorn
with uvloop, httptools and websockets.

Routes (bodies are JSON, or msgpack with ``Content-Type: application/msgpack``; the answer is in
the request's encoding)::

    POST /v1/sessions              {"session"?}                     -> {"session", "model", "step", "state"}
    POST /v1/act                   {"session", "obs", "state"?, "deterministic"?, "return_state"?}
                                   or {"requests": [...]}           -> a decision, or {"results": [...]}
    POST /v1/reward                {"session", "reward", "step"?, "done"?, "truncated"?, "state"?}
    POST /v1/sessions/{id}/end
    GET  /v1/stream                WebSocket: the same operations as messages with "op" and "id"
    GET  /health  /ready  /metrics
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import math
from typing import Any
from urllib.parse import parse_qs

import msgpack
import numpy as np

from cogbert_cloud.service.decide.engine import ActItem, Engine
from cogbert_cloud.service.decide.errors import BadRequest, DecideError, TooLarge
from cogbert_edge.errors import ConfigError

__all__ = ["DecideApp"]

log = logging.getLogger("cogbert.decide")
_JSON = b"application/json"
_MSGPACK = b"application/msgpack"
_F32LE = np.dtype("<f4")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _Codec:
    """JSON or msgpack, both ways. In JSON, state tokens are base64url strings; in msgpack, bytes
    (and an observation may be float32 little-endian bytes)."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary
        self.content_type = _MSGPACK if binary else _JSON

    def loads(self, body: bytes) -> Any:
        try:
            if self.binary:
                return msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
            return json.loads(body)
        except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as e:
            raise BadRequest(f"body is not valid {'msgpack' if self.binary else 'JSON'}: {str(e)[:80]}") from None

    def dumps(self, obj: Any) -> bytes:
        if self.binary:
            return msgpack.packb(obj)
        return json.dumps(_tokens_to_text(obj), separators=(",", ":")).encode()


def _tokens_to_text(obj: Any) -> Any:
    if isinstance(obj, dict):
        st = obj.get("state")
        if isinstance(st, bytes):
            obj = {**obj, "state": _b64(st)}
        if "results" in obj:
            obj = {**obj, "results": [_tokens_to_text(r) for r in obj["results"]]}
    return obj


def _want(d: dict, key: str, typ: type | tuple, default: Any = None) -> Any:
    v = d.get(key, default)
    if v is None and default is None:
        return None
    if not isinstance(v, typ) or (typ is not bool and isinstance(v, bool)):
        name = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise BadRequest(f"field {key!r} must be {name}")
    return v


class DecideApp:
    def __init__(self, engine: Engine) -> None:
        if engine.clients is None:
            raise ConfigError("the service needs a clients file: every request is authenticated")
        self.engine = engine
        self.max_body = engine.s.max_body_bytes
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._lat = {t: engine.metrics.latency.labels(t) for t in ("http", "ws")}
        self._json, self._msgpack = _Codec(False), _Codec(True)

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._ws(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    if not self.engine.ready:
                        self.engine.start()
                except Exception as e:  # noqa: BLE001 - reported to the server, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                # The server has stopped accepting and drained in-flight requests; flush the logs.
                await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _count(self, transport: str, op: str, status: int) -> None:
        key = (transport, op, status)
        c = self._counters.get(key)
        if c is None:
            c = self._counters[key] = self.engine.metrics.requests.labels(transport, op, str(status))
        c.inc()

    # -- HTTP -------------------------------------------------------------------------------

    async def _http(self, scope: dict, receive: Any, send: Any) -> None:
        t0 = asyncio.get_running_loop().time()
        method, path = scope["method"], scope["path"]
        headers = dict(scope["headers"])
        codec = self._msgpack if headers.get(b"content-type", b"").startswith(_MSGPACK) else self._json
        op = "other"
        try:
            if method == "GET":
                if path == "/health":
                    return await self._respond(send, 200, b'{"status":"ok"}', _JSON)
                if path == "/ready":
                    ok = self.engine.ready
                    return await self._respond(send, 200 if ok else 503,
                                               b'{"ready":true}' if ok else b'{"ready":false}', _JSON)
                if path == "/metrics":
                    return await self._respond(send, 200, self.engine.metrics.render(),
                                               b"text/plain; version=0.0.4")
                raise _NotFound(path)
            if method != "POST":
                raise _NotFound(path)
            client = self.engine.authenticate(headers.get(b"authorization"))
            body = await self._body(headers, receive)
            doc = codec.loads(body)
            if not isinstance(doc, dict):
                raise BadRequest("the body must be an object")
            if path == "/v1/act":
                op = "act"
                status, out = await self._act(client, doc)
            elif path == "/v1/sessions":
                op = "start"
                status, out = 200, self.engine.start_session(client, _want(doc, "session", str))
            elif path == "/v1/reward":
                op = "reward"
                status, out = 200, self._reward(client, doc)
            elif path.startswith("/v1/sessions/") and path.endswith("/end"):
                op = "end"
                status, out = 200, self.engine.end_session(client, path[len("/v1/sessions/"):-len("/end")])
            else:
                raise _NotFound(path)
            self._count("http", op, status)
            await self._respond(send, status, codec.dumps(out), codec.content_type,
                                retry_after=out.get("retry_after") if status >= 400 else None)
            self._lat["http"].observe(asyncio.get_running_loop().time() - t0)
        except DecideError as e:
            if e.code == "bad_state_token":
                self.engine.metrics.token_refused.inc()
            self._count("http", op, e.status)
            await self._respond(send, e.status, codec.dumps(e.body()), codec.content_type, retry_after=e.retry_after)
        except _NotFound as e:
            self._count("http", op, 404)
            await self._respond(send, 404, codec.dumps({"error": "not_found", "message": f"no route {e}"}),
                                codec.content_type)

    async def _body(self, headers: dict, receive: Any) -> bytes:
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if declared > self.max_body:
                raise TooLarge(f"body of {declared} bytes is over the {self.max_body}-byte limit")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BadRequest("the client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge(f"body is over the {self.max_body}-byte limit")
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _respond(send: Any, status: int, body: bytes, ctype: bytes, retry_after: float | None = None) -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        if retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- operations (both transports) ---------------------------------------------------------

    def _items(self, doc: dict) -> tuple[list[ActItem], bool]:
        reqs = doc.get("requests")
        if reqs is None:
            return [self._item(doc)], False
        if not isinstance(reqs, list) or not reqs:
            raise BadRequest("'requests' must be a non-empty list of decisions")
        if len(reqs) > self.engine.s.max_items:
            raise TooLarge(f"{len(reqs)} decisions in one request; the limit is {self.engine.s.max_items}")
        items = [self._item(r) for r in reqs]
        if len({it.session for it in items}) != len(items):
            raise BadRequest("a session appears twice in one request: send its next decision after this one")
        return items, True

    def _item(self, d: Any) -> ActItem:
        if not isinstance(d, dict):
            raise BadRequest("a decision request must be an object")
        engine = self.engine
        session = engine.check_session(d.get("session"))
        raw = d.get("obs")
        n = engine.obs_dim
        if isinstance(raw, bytes):
            if len(raw) != 4 * n:
                raise BadRequest(f"obs as bytes must be {n} float32 ({4 * n} bytes), got {len(raw)} bytes")
            obs = np.frombuffer(raw, _F32LE)       # a read-only view; the batch step stacks a copy
        elif isinstance(raw, list):
            if len(raw) != n:
                raise BadRequest(f"obs must have {n} numbers, got {len(raw)}")
            try:
                obs = np.array(raw, np.float32)
            except (ValueError, TypeError):
                raise BadRequest("obs must be a list of numbers") from None
            if obs.shape != (n,):
                raise BadRequest(f"obs must be a flat list of {n} numbers")
        else:
            raise BadRequest(f"obs must be a list of {n} numbers" + (" (or float32 bytes)" if raw is not None else ""))
        if not np.isfinite(obs).all():
            raise BadRequest("obs holds NaN or Inf")
        token = d.get("state")
        if token is not None and not isinstance(token, (str, bytes)):
            raise BadRequest("state must be the state token of the session's previous decision")
        return ActItem(session, obs, token, bool(_want(d, "deterministic", bool, False)),
                       bool(_want(d, "return_state", bool, True)))

    async def _act(self, client: Any, doc: dict) -> tuple[int, dict]:
        items, many = self._items(doc)
        results = await self.engine.act(client, items)
        if many:
            return 200, {"results": results}
        r = results[0]
        return (r["status"], r) if "error" in r else (200, r)

    def _reward(self, client: Any, doc: dict) -> dict:
        value = _want(doc, "reward", (int, float))
        if value is None or not math.isfinite(value):
            raise BadRequest("reward must be a finite number")
        step = _want(doc, "step", int)
        if step is not None and step < 0:
            raise BadRequest("step must be >= 0")
        token = doc.get("state")
        if token is not None and not isinstance(token, (str, bytes)):
            raise BadRequest("state must be a state token")
        return self.engine.reward(client, doc.get("session"), float(value), step=step,  # type: ignore[arg-type]
                                  done=bool(_want(doc, "done", bool, False)),
                                  truncated=bool(_want(doc, "truncated", bool, False)), token=token)

    # -- WebSocket ----------------------------------------------------------------------------

    async def _ws(self, scope: dict, receive: Any, send: Any) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization")
        if auth is None:   # browsers cannot set headers on a WebSocket: ?access_token= instead
            q = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if q.get("access_token"):
                auth = b"Bearer " + q["access_token"][0].encode("latin-1")
        try:
            client = self.engine.authenticate(auth)
        except DecideError as e:
            self._count("ws", "connect", e.status)
            await send({"type": "websocket.close", "code": 4000 + e.status, "reason": str(e)[:120]})
            return
        await send({"type": "websocket.accept"})
        self._count("ws", "connect", 101)
        out: asyncio.Queue = asyncio.Queue()
        room = asyncio.Condition()
        state = {"inflight": 0, "closed": False}
        limit = self.engine.s.ws_max_inflight

        async def sender() -> None:
            while True:
                item = await out.get()
                if item is None:
                    return
                payload, n = item
                try:
                    if isinstance(payload, bytes):
                        await send({"type": "websocket.send", "bytes": payload})
                    else:
                        await send({"type": "websocket.send", "text": payload})
                except Exception:  # noqa: BLE001 - the client went away: stop sending
                    state["closed"] = True
                async with room:
                    state["inflight"] -= n
                    room.notify_all()

        async def handle(doc: Any, codec: _Codec, n: int) -> None:
            t0 = asyncio.get_running_loop().time()
            rid = doc.get("id") if isinstance(doc, dict) else None
            op = doc.get("op", "act") if isinstance(doc, dict) else "?"
            try:
                if not isinstance(doc, dict):
                    raise BadRequest("a message must be an object")
                if op == "act":
                    status, res = await self._act(client, doc)
                elif op == "start":
                    status, res = 200, self.engine.start_session(client, _want(doc, "session", str))
                elif op == "reward":
                    status, res = 200, self._reward(client, doc)
                elif op == "end":
                    status, res = 200, self.engine.end_session(client, doc.get("session"))  # type: ignore[arg-type]
                else:
                    raise BadRequest(f"unknown op {str(op)[:20]!r}: act, start, reward or end")
            except DecideError as e:
                status, res = e.status, {**e.body(), "status": e.status, "retry_after": e.retry_after}
            res = {**res, "id": rid, "status": status} if rid is not None else {**res, "status": status}
            self._count("ws", str(op)[:8] if op in ("act", "start", "reward", "end") else "other", status)
            self._lat["ws"].observe(asyncio.get_running_loop().time() - t0)
            await out.put((codec.dumps(res) if codec.binary else codec.dumps(res).decode(), n))

        task = asyncio.ensure_future(sender())
        pending: set[asyncio.Task] = set()
        try:
            while not state["closed"]:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                codec = self._msgpack if data is not None else self._json
                if data is None:
                    data = (msg.get("text") or "").encode()
                if len(data) > self.max_body:
                    doc: Any = None
                    err = TooLarge(f"message of {len(data)} bytes is over the {self.max_body}-byte limit")
                    await out.put((codec.dumps({**err.body(), "status": 413}) if codec.binary else
                                   codec.dumps({**err.body(), "status": 413}).decode(), 0))
                    continue
                try:
                    doc = codec.loads(data)
                except DecideError as e:
                    body = {**e.body(), "status": e.status}
                    await out.put((codec.dumps(body) if codec.binary else codec.dumps(body).decode(), 0))
                    continue
                reqs = doc.get("requests") if isinstance(doc, dict) else None
                n = len(reqs) if isinstance(reqs, list) else 1
                async with room:   # backpressure: stop reading while too much is in flight
                    await room.wait_for(functools.partial(_has_room, state, n, limit))
                    state["inflight"] += n
                t = asyncio.ensure_future(handle(doc, codec, n))
                pending.add(t)
                t.add_done_callback(pending.discard)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await out.put(None)
            await task


def _has_room(state: dict, n: int, limit: int) -> bool:
    return state["inflight"] == 0 or state["inflight"] + n <= limit


class _NotFound(Exception):
    pass
