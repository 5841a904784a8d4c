"""The load generator of ``cogbert-bench serve``: client processes over real sockets, closed-loop
(saturating) or open-loop at a given rate, with latency from each request's scheduled send time
(no coordinated omission)."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import time
from typing import Any

import msgpack
import numpy as np

OBS_DIM = 64


# -- the load generator --------------------------------------------------------------------------


def _http_request(host: str, path: str, body: bytes, token: str, ctype: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


class _Stats:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.overhead: list[float] = []
        self.batch: list[int] = []
        self.errors = 0
        self.done = 0


async def _http_conn(host: str, kind: str, token: str, session: str, stats: _Stats, until: float,
                     interval: float | None, tokens: bool, t_start: float) -> None:
    h, p = host.split(":")
    reader, writer = await asyncio.open_connection(h, int(p))
    obs = np.random.default_rng(abs(hash(session)) % 2**32).standard_normal((64, OBS_DIM)).astype(np.float32)
    cogbert = kind == "cogbert"
    state = None
    if cogbert:
        writer.write(_http_request(host, "/v1/sessions", msgpack.packb({"session": session}), token,
                                   "application/msgpack"))
        _, body = await _read_response(reader)
        state = msgpack.unpackb(body)["state"] if tokens else None
    i = 0
    # Open loop: each connection sends on its own schedule, latency counted from it. The
    # schedules are staggered (a random phase each): connections started in step would send
    # in bursts of all of them at once, and measure the burst, not the load.
    next_t = t_start + (random.random() * interval if interval is not None else 0.0)
    while True:
        if interval is not None:
            next_t += interval
            now = time.perf_counter()
            if next_t > now:
                await asyncio.sleep(next_t - now)
            t0 = next_t
        else:
            t0 = time.perf_counter()
        if t0 >= until:
            break
        x = obs[i % 64]
        i += 1
        if cogbert:
            q: dict = {"session": session, "obs": x.tobytes(), "return_state": tokens}
            if state is not None:
                q["state"] = state
            writer.write(_http_request(host, "/v1/act", msgpack.packb(q), token, "application/msgpack"))
        else:
            writer.write(_http_request(host, "/v1/act", json.dumps({"session": session, "obs": x.tolist()}).encode(),
                                       token, "application/json"))
        status, body = await _read_response(reader)
        t1 = time.perf_counter()
        if status != 200:
            stats.errors += 1
            continue
        r = msgpack.unpackb(body) if cogbert else json.loads(body)
        if cogbert:
            state = r.get("state")
            stats.overhead.append(r["latency_us"] - r["compute_us"])
        stats.batch.append(r.get("batch", 0))
        stats.lat.append(t1 - t0)
        stats.done += 1
    writer.close()


async def _ws_conn(host: str, token: str, prefix: str, group: int, inflight: int, stats: _Stats, until: float,
                   interval: float | None, tokens: bool, t_start: float) -> None:
    from websockets.asyncio.client import connect

    ws = await connect(f"ws://{host}/v1/stream", additional_headers={"Authorization": f"Bearer {token}"},
                       compression=None, max_size=1 << 24)
    # Each of the `inflight` lanes of this socket owns `group` sessions: a session has one
    # decision in flight at a time (as a real client's would), and lanes run concurrently.
    rng = np.random.default_rng(abs(hash(prefix)) % 2**32)
    obs = rng.standard_normal((64, OBS_DIM)).astype(np.float32)
    waiting: dict[int, tuple[asyncio.Future, float]] = {}

    async def reader() -> None:
        async for raw in ws:
            r = msgpack.unpackb(raw)
            fut, _ = waiting.pop(r["id"])
            fut.set_result(r)

    rt = asyncio.ensure_future(reader())
    ids = iter(range(1, 1 << 62))
    states: dict[str, Any] = {}

    async def call(msg: dict) -> dict:
        msg["id"] = next(ids)
        fut = asyncio.get_running_loop().create_future()
        waiting[msg["id"]] = (fut, 0.0)
        await ws.send(msgpack.packb(msg))
        return await fut

    async def lane(k: int) -> None:
        names = [f"{prefix}-{k}-{j}" for j in range(group)]
        for n in names:
            r = await call({"op": "start", "session": n})
            states[n] = r["state"] if tokens else None
        i = 0
        next_t = t_start + (random.random() * interval if interval is not None else 0.0)   # staggered
        while True:
            if interval is not None:
                next_t += interval
                now = time.perf_counter()
                if next_t > now:
                    await asyncio.sleep(next_t - now)
                t0 = next_t
            else:
                t0 = time.perf_counter()
            if t0 >= until:
                return
            x = obs[i % 64].tobytes()
            i += 1
            reqs = []
            for n in names:
                q: dict = {"session": n, "obs": x, "return_state": tokens}
                if states[n] is not None:
                    q["state"] = states[n]
                reqs.append(q)
            r = await call({"op": "act", "requests": reqs})
            t1 = time.perf_counter()
            if r.get("status") != 200:
                stats.errors += len(names)
                continue
            for x_ in r["results"]:
                if "error" in x_:
                    stats.errors += 1
                    continue
                states[x_["session"]] = x_.get("state")
                stats.overhead.append(x_["latency_us"] - x_["compute_us"])
                stats.lat.append(t1 - t0)
                stats.done += 1

    await asyncio.gather(*(lane(k) for k in range(inflight)))
    rt.cancel()
    await ws.close()


def _client(job: dict, out: Any) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    stats = _Stats()

    async def run() -> None:
        t_start = time.perf_counter() + 0.5          # every connection is set up before timing starts
        until = t_start + job["seconds"]
        if job["transport"] == "http":
            conns = [_http_conn(job["host"], job["kind"], job["token"], f"{job['name']}-{i}", stats, until,
                                job["interval"], job["tokens"], t_start) for i in range(job["connections"])]
        else:
            conns = [_ws_conn(job["host"], job["token"], f"{job['name']}-{i}", job["group"], job["inflight"], stats,
                              until, job["interval"], job["tokens"], t_start) for i in range(job["connections"])]
        await asyncio.gather(*conns)

    asyncio.run(run())
    out.put({"lat": stats.lat, "overhead": stats.overhead, "batch": stats.batch, "errors": stats.errors,
             "done": stats.done, "seconds": job["seconds"]})


def _load(host: str, kind: str, transport: str, a: argparse.Namespace, token: str, *, rate: float | None,
          name: str, connections: int | None = None, clients: int | None = None) -> dict:
    """Run the clients; ``rate`` (decisions/s over all clients) makes it open-loop."""
    clients = clients or a.clients
    conns = connections or (a.connections if transport == "http" else a.ws_connections)
    per_message = a.ws_group if transport == "ws" else 1
    lanes = conns * (a.ws_inflight if transport == "ws" else 1) * clients
    interval = None if rate is None else lanes * per_message / rate
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_client, args=({"host": host, "kind": kind, "transport": transport, "token": token,
                                                  "name": f"{name}-{i}", "connections": conns,
                                                  "group": a.ws_group, "inflight": a.ws_inflight,
                                                  "seconds": a.seconds, "interval": interval,
                                                  "tokens": a.tokens}, q)) for i in range(clients)]
    for p in procs:
        p.start()
    parts: list[dict] = []
    deadline = time.monotonic() + a.seconds + 120
    while len(parts) < len(procs):
        try:
            parts.append(q.get(timeout=1.0))
        except Exception:  # noqa: BLE001 - queue.Empty: check that the clients are still alive
            if time.monotonic() > deadline or all(not p.is_alive() for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError("load-generator processes died or hung") from None
    for p in procs:
        p.join()
    lat = np.concatenate([np.asarray(x["lat"]) for x in parts]) if parts else np.zeros(0)
    over = np.concatenate([np.asarray(x["overhead"]) for x in parts])
    batch = np.concatenate([np.asarray(x["batch"]) for x in parts])
    done = sum(x["done"] for x in parts)
    return {"decisions_per_s": round(done / a.seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 3) if len(lat) else None,
            "server_overhead_us_p50": round(float(np.percentile(over, 50)), 1) if len(over) else None,
            "mean_batch": round(float(batch[batch > 0].mean()), 2) if (batch > 0).any() else None,
            "errors": sum(x["errors"] for x in parts)}
