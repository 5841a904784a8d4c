"""A client for the Cogbert decision service (``cogbert cloud decide serve``), for applications
that do not run a model themselves.

    from cogbert_edge import DecideClient

    with DecideClient("http://decide:8080", token=os.environ["COGBERT_DECIDE_TOKEN"]) as client:
        session = client.start_session("line-a")
        d = client.act("line-a", obs)           # d.action, d.log_prob, d.value, d.model, d.step
        client.reward("line-a", 1.0)
        client.end_session("line-a")

The client keeps each session's latest state token and sends it with the next decision, so any
replica behind a load balancer can take the next step. It reconnects after a broken
connection, and retries a decision refused with 503 (overloaded, shutting down) after the
server's Retry-After, up to ``retries`` times. A retried decision carries the same state token:
the service decides it again from the same state with the same random number (the same action),
so a retry never skips or repeats a step.

``AsyncDecideClient`` does the same over one WebSocket, with many decisions in flight and
``act_many`` for several sessions in one message; it needs the ``websockets`` package.
Errors the service reports are :class:`DecideRequestError` with its HTTP ``status`` and
``code``; a service that cannot be reached is :class:`DecideUnavailable`.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from cogbert_edge.errors import CogbertError, ConfigError, DecideRequestError, DecideUnavailable

__all__ = ["DecideClient", "AsyncDecideClient", "RemoteDecision", "DecideRequestError", "DecideUnavailable"]


@dataclass(frozen=True)
class RemoteDecision:
    """A decision the service made. ``log_prob`` is the behaviour log-probability of ``action``;
    ``latency_us`` is the time the decision spent in the server; ``fallback`` marks the
    configured fallback action served past a deadline."""

    session: str
    action: Any
    log_prob: float
    value: float
    model: str
    step: int
    latency_us: float
    fallback: bool = False

    @classmethod
    def of(cls, r: dict) -> RemoteDecision:
        return cls(r["session"], r["action"], r["log_prob"], r["value"], r["model"], r["step"],
                   r.get("latency_us", 0.0), bool(r.get("fallback", False)))


def _obs(obs: Any, binary: bool) -> Any:
    a = np.asarray(obs, np.float32)
    return a.astype("<f4").tobytes() if binary else a.tolist()


def _raise_for(r: dict, status: int) -> None:
    if status >= 400 or "error" in r:
        raise DecideRequestError(r.get("status", status), r.get("error", "error"), r.get("message", ""),
                                 r.get("retry_after"))


class _Sessions:
    """The latest state token of each session (a bounded dict: ends and done clear entries)."""

    def __init__(self) -> None:
        self.tokens: dict[str, Any] = {}

    def take(self, r: dict) -> None:
        if r.get("state") is not None:
            self.tokens[r["session"]] = r["state"]


class DecideClient:
    """Synchronous HTTP client with keep-alive. Not thread-safe: one per thread."""

    def __init__(self, url: str, token: str, *, encoding: str = "msgpack", timeout: float = 10.0,
                 retries: int = 3, tls: ssl.SSLContext | None = None, use_state_tokens: bool = True) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"url must be http(s)://host:port, got {url!r}")
        if encoding not in ("msgpack", "json"):
            raise ConfigError("encoding must be 'msgpack' or 'json'")
        self.host, self.port = u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.https, self.tls = u.scheme == "https", tls
        self.binary = encoding == "msgpack"
        self.timeout, self.retries = timeout, retries
        self.use_state_tokens = use_state_tokens
        self._headers = {"Authorization": f"Bearer {token}",
                         "Content-Type": "application/msgpack" if self.binary else "application/json"}
        self._conn: http.client.HTTPConnection | None = None
        self.sessions = _Sessions()
        self.reconnects = 0

    def __enter__(self) -> DecideClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- operations -------------------------------------------------------------------------

    def start_session(self, session: str | None = None) -> str:
        r = self._post("/v1/sessions", {} if session is None else {"session": session})
        self.sessions.take(r)
        return r["session"]

    def act(self, session: str, obs: Any, *, deterministic: bool = False) -> RemoteDecision:
        body: dict[str, Any] = {"session": session, "obs": _obs(obs, self.binary), "deterministic": deterministic,
                                "return_state": self.use_state_tokens}
        if self.use_state_tokens and session in self.sessions.tokens:
            body["state"] = self.sessions.tokens[session]
        r = self._post("/v1/act", body)
        self.sessions.take(r)
        return RemoteDecision.of(r)

    def act_many(self, observations: dict[str, Any], *, deterministic: bool = False) -> dict[str, RemoteDecision]:
        """One decision for each session in one request."""
        reqs = []
        for session, obs in observations.items():
            q: dict[str, Any] = {"session": session, "obs": _obs(obs, self.binary), "deterministic": deterministic,
                                 "return_state": self.use_state_tokens}
            if self.use_state_tokens and session in self.sessions.tokens:
                q["state"] = self.sessions.tokens[session]
            reqs.append(q)
        out = {}
        for r in self._post("/v1/act", {"requests": reqs})["results"]:
            _raise_for(r, 200)
            self.sessions.take(r)
            out[r["session"]] = RemoteDecision.of(r)
        return out

    def reward(self, session: str, value: float, *, step: int | None = None, done: bool = False,
               truncated: bool = False) -> None:
        body: dict[str, Any] = {"session": session, "reward": float(value), "done": done, "truncated": truncated}
        if step is not None:
            body["step"] = step
        if session in self.sessions.tokens:
            body["state"] = self.sessions.tokens[session]
        self.sessions.take(self._post("/v1/reward", body))

    def end_session(self, session: str) -> None:
        self._post(f"/v1/sessions/{urllib.parse.quote(session, safe='')}/end", {})
        self.sessions.tokens.pop(session, None)

    # -- transport --------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=self.tls or ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def _post(self, path: str, body: dict) -> dict:
        data = msgpack.packb(body) if self.binary else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                conn = self._connect()
                conn.request("POST", path, data, self._headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                last = e
                self.close()
                self.reconnects += 1
                time.sleep(min(2.0, 0.05 * 2 ** attempt))
                continue
            ctype = resp.getheader("Content-Type", "")
            try:
                r = msgpack.unpackb(raw, raw=False) if ctype.startswith("application/msgpack") else json.loads(raw)
            except ValueError:
                raise DecideRequestError(resp.status, "bad_response", raw[:200].decode("utf-8", "replace")) from None
            if resp.status == 503 and attempt < self.retries:
                time.sleep(min(float(resp.getheader("Retry-After", "1")), 5.0))
                continue
            _raise_for(r, resp.status)
            return r
        raise DecideUnavailable(f"decision service at {self.host}:{self.port} unreachable: {last}")


class AsyncDecideClient:
    """Asynchronous client over one WebSocket: many decisions in flight, answered in order per
    session. ``await client.connect()`` (or ``async with``) first."""

    def __init__(self, url: str, token: str, *, encoding: str = "msgpack", retries: int = 3,
                 tls: ssl.SSLContext | None = None, use_state_tokens: bool = True, open_timeout: float = 10.0) -> None:
        u = urllib.parse.urlsplit(url)
        scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(u.scheme)
        if scheme is None or not u.hostname:
            raise ConfigError(f"url must be http(s):// or ws(s)://host:port, got {url!r}")
        self.url = f"{scheme}://{u.netloc}/v1/stream"
        self.token, self.tls = token, tls
        self.binary = encoding == "msgpack"
        self.retries, self.open_timeout = retries, open_timeout
        self.use_state_tokens = use_state_tokens
        self.sessions = _Sessions()
        self._ws: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, dict]] = {}
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.reconnects = 0

    async def __aenter__(self) -> AsyncDecideClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            from websockets.asyncio.client import connect
        except ImportError as e:   # pragma: no cover - depends on the installation
            raise DecideUnavailable("AsyncDecideClient needs the websockets package: "
                                    "pip install 'cogbert[decide-client]'") from e
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                self._ws = await connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
                                         ssl=self.tls if self.url.startswith("wss") else None,
                                         open_timeout=self.open_timeout, compression=None, max_size=16 << 20)
                break
            except (OSError, asyncio.TimeoutError) as e:
                last = e
                await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
            except Exception as e:  # noqa: BLE001 - a refused handshake (bad token): say so, no retries
                raise DecideRequestError(401, "refused", str(e)) from None
        else:
            raise DecideUnavailable(f"decision service at {self.url} unreachable: {last}")
        self._reader = asyncio.ensure_future(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(DecideUnavailable("client closed"))

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                r = msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) else json.loads(raw)
                entry = self._pending.pop(r.get("id"), None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(r)
        except Exception:  # noqa: BLE001 - the connection broke: resend what is pending
            pass
        if self._pending:
            asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        async with self._lock:
            self.reconnects += 1
            try:
                await self.connect()
            except CogbertError as e:
                for fut, _ in self._pending.values():
                    if not fut.done():
                        fut.set_exception(e)
                self._pending.clear()
                return
            for _, msg in list(self._pending.values()):   # the same tokens: decided again, identically
                await self._send(msg)

    async def _send(self, msg: dict) -> None:
        await self._ws.send(msgpack.packb(msg) if self.binary else json.dumps(msg))

    async def _call(self, msg: dict) -> dict:
        if self._ws is None:
            await self.connect()
        msg["id"] = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg["id"]] = (fut, msg)
        for attempt in range(self.retries + 1):
            try:
                await self._send(msg)
            except Exception:  # noqa: BLE001 - broken: the reader reconnects and resends
                await asyncio.sleep(0.05 * 2 ** attempt)
                if not fut.done() and msg["id"] in self._pending and attempt == self.retries:
                    raise DecideUnavailable(f"decision service at {self.url} unreachable") from None
                continue
            break
        r = await fut
        return r

    async def start_session(self, session: str | None = None) -> str:
        r = await self._call({"op": "start", **({} if session is None else {"session": session})})
        _raise_for(r, r.get("status", 200))
        self.sessions.take(r)
        return r["session"]

    def _request(self, session: str, obs: Any, deterministic: bool) -> dict:
        q: dict[str, Any] = {"session": session, "obs": _obs(obs, self.binary), "deterministic": deterministic,
                             "return_state": self.use_state_tokens}
        if self.use_state_tokens and session in self.sessions.tokens:
            q["state"] = self.sessions.tokens[session]
        return q

    async def act(self, session: str, obs: Any, *, deterministic: bool = False) -> RemoteDecision:
        r = await self._call({"op": "act", **self._request(session, obs, deterministic)})
        _raise_for(r, r.get("status", 200))
        self.sessions.take(r)
        return RemoteDecision.of(r)

    async def act_many(self, observations: dict[str, Any] | Sequence[tuple[str, Any]], *,
                       deterministic: bool = False) -> dict[str, RemoteDecision]:
        pairs = observations.items() if isinstance(observations, dict) else observations
        r = await self._call({"op": "act", "requests": [self._request(s, o, deterministic) for s, o in pairs]})
        _raise_for(r, r.get("status", 200))
        out = {}
        for x in r["results"]:
            _raise_for(x, 200)
            self.sessions.take(x)
            out[x["session"]] = RemoteDecision.of(x)
        return out

    async def reward(self, session: str, value: float, *, step: int | None = None, done: bool = False,
                     truncated: bool = False) -> None:
        msg: dict[str, Any] = {"op": "reward", "session": session, "reward": float(value), "done": done,
                               "truncated": truncated}
        if step is not None:
            msg["step"] = step
        if session in self.sessions.tokens:
            msg["state"] = self.sessions.tokens[session]
        r = await self._call(msg)
        _raise_for(r, r.get("status", 200))
        self.sessions.take(r)

    async def end_session(self, session: str) -> None:
        r = await self._call({"op": "end", "session": session})
        _raise_for(r, r.get("status", 200))
        self.sessions.tokens.pop(session, None)
