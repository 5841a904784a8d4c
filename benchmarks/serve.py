"""``cogbert-bench serve``: the decision service under load, beside two peers serving the same model.

Servers, each in its own process on a loopback port, serving the reference model (obs 64,
LSTM 256, 8 actions) in int8:

- ``cogbert``: ``cogbert cloud decide serve`` (uvicorn + uvloop + httptools, the native backend's
  batch step through ``Policy.act_batch``), over HTTP (one decision a request) and WebSocket
  (``--ws-group`` sessions' decisions a message).
- ``ray``: Ray Serve, one replica, ``@serve.batch`` (max_batch_size 32, batch_wait_timeout_s
  0.002 instead of the defaults 10 and 0.01, a shorter wait for a 10 µs model), the same Policy
  in the replica, session states in a dict; HTTP through Ray's proxy.
- ``fastapi-onnx``: FastAPI on uvicorn, one ONNX Runtime call a request (what a user writes first).

The load generator runs in ``--clients`` separate processes, over real sockets. Each transport
is measured twice: closed-loop with enough connections to saturate it (the saturating
throughput), then open-loop at ``--load`` (80 %) of that rate, where latency is taken from each
request's scheduled send time (no coordinated omission). ``server_overhead_us_p50`` is the
service's own time for a decision (its ``latency_us`` less the batch step's ``compute_us``) at
light load: one connection, one decision at a time. ``mean_batch`` is from the server's batch
histogram. The machine's two cores run the clients and the server together: read ratios
measured in one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

__all__ = ["register", "main", "table"]

OBS_DIM = 64


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the decision service under load (HTTP, WebSocket) and two peers")
    p.add_argument("--transport", default="http,ws", help="comma-separated: http, ws")
    p.add_argument("--peers", default="ray,fastapi-onnx", help="comma-separated peers to run too ('' for none)")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each measured phase")
    p.add_argument("--load", type=float, default=0.8, help="open-loop rate as a share of the saturating one")
    p.add_argument("--connections", type=int, default=32, help="HTTP connections per client process")
    p.add_argument("--ws-connections", type=int, default=4, help="WebSockets per client process")
    p.add_argument("--ws-group", type=int, default=16, help="sessions per WebSocket message")
    p.add_argument("--ws-inflight", type=int, default=4, help="messages in flight per WebSocket")
    p.add_argument("--max-wait-us", type=int, default=0, help="the service's batching wait")
    p.add_argument("--tokens", action="store_true", help="clients echo state tokens (default: server cache)")
    p.add_argument("--frameworks", action="store_true",
                   help="instead: the per-request cost of candidate servers and frameworks on a trivial endpoint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


# -- the servers -----------------------------------------------------------------------------


def _site(work: Path) -> dict:
    from cogbert_bench.edge import bundles
    from cogbert_cloud.release.signing import KeyStore, create_release
    from cogbert_cloud.service.decide.auth import add_client

    _, params, paths = bundles(work, 0)
    raw = paths["int8"].read_bytes()
    keys = KeyStore.init(work / "keys")
    (work / "root.json").write_bytes(keys.root_bytes())
    (work / "release.json").write_bytes(create_release(raw, keys, counter=1, model="cogbert", fleet="bench"))
    token = add_client(work / "clients.json", "bench", "bench", rate=1e9, burst=1e9)
    return {"work": work, "bundle": paths["int8"], "fp32": paths["fp32"], "params": params, "token": token,
            "state_keys": "1:" + secrets.token_hex(32)}


def _free_port() -> int:
    from cogbert_cloud.fleet.broker import free_port
    return free_port()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server not ready at {url}: {log.read_text()[-1500:]}")


def _start(kind: str, site: dict, max_wait_us: int) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = site["work"] / f"{kind}.log"
    w = site["work"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kind == "cogbert":
        cmd = [sys.executable, "-c", "import sys; from cogbert_cloud.cli import main; sys.exit(main())", "cloud",
               "decide", "serve", "--trust-root", str(w / "root.json"), "--manifest", str(w / "release.json"),
               "--bundle", str(site["bundle"]), "--fleet", "bench", "--clients", str(w / "clients.json"),
               "--state-keys", site["state_keys"], "--spool", str(w / "spool"), "--port", str(port),
               "--lanes", "decide-bench", "--backend", "native", "--max-wait-us", str(max_wait_us),
               "--max-queue", "65536", "--deadline-ms", "1000"]
        ready = f"http://127.0.0.1:{port}/ready"
    else:
        cmd = [sys.executable, "-m", "cogbert_bench.serve", "--peer", kind, "--port", str(port), "--bundle",
               str(site["bundle"] if kind == "ray" else site["fp32"])]
        ready = f"http://127.0.0.1:{port}/health"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    _wait_ready(ready, proc, log, timeout=300 if kind == "ray" else 120)   # Ray starts a cluster first
    return proc, f"127.0.0.1:{port}", log


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _ray_server(port: int, bundle: Path) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from cogbert_edge import Policy

    ray.init(num_cpus=2, include_dashboard=False, logging_level=40)   # logging.ERROR
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=1000)
    class Decide:
        def __init__(self) -> None:
            self.policy = Policy.load(bundle, "native")
            self.states: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            self.zero = np.zeros(self.policy.config.hidden, np.float32)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def decide(self, reqs: list[dict]) -> list[dict]:
            from cogbert_edge import State
            obs = np.asarray([r["obs"] for r in reqs], np.float32)
            st = [self.states.get(r["session"], (self.zero, self.zero)) for r in reqs]
            d = self.policy.act_batch(obs, State(np.stack([s[0] for s in st]), np.stack([s[1] for s in st])))
            out = []
            for i, r in enumerate(reqs):
                self.states[r["session"]] = (d.state.h[i].copy(), d.state.c[i].copy())
                out.append({"action": int(d.action[i]), "log_prob": float(d.log_prob[i]),
                            "value": float(d.value[i]), "batch": len(reqs)})
            return out

        async def __call__(self, request: Request) -> Any:
            if request.url.path.endswith("/health"):
                return JSONResponse({"ok": True})
            return JSONResponse(await self.decide(await request.json()))

    serve.run(Decide.bind(), route_prefix="/")  # type: ignore[attr-defined]
    while True:
        time.sleep(3600)


def _fastapi_onnx_server(port: int, bundle: Path) -> None:
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from cogbert_bench.peers import onnx_model
    from cogbert_edge import load_bundle

    b = load_bundle(bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model(b.fp32_params(), b.config).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    hidden = b.config.hidden
    states: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    zero = np.zeros((1, hidden), np.float32)
    rng = np.random.default_rng(0)
    app = FastAPI()

    class Act(BaseModel):
        session: str
        obs: list[float]

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    def act(req: Act) -> dict:
        h, c = states.get(req.session, (zero, zero))
        head, value, h2, c2 = sess.run(["head", "value", "h_out", "c_out"],
                                       {"obs": np.asarray([req.obs], np.float32), "h": h, "c": c})
        states[req.session] = (h2, c2)
        p = np.exp(head[0] - head[0].max())
        p /= p.sum()
        a = int(rng.choice(len(p), p=p))
        return {"action": a, "log_prob": float(np.log(p[a])), "value": float(value[0, 0]), "batch": 1}

    act.__annotations__.update(req=Act, **{"return": dict})   # resolved here, not in module globals (PEP 563)
    app.post("/v1/act")(act)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- server and framework candidates, on a trivial endpoint -------------------------------------

FRAMEWORKS = ("asgi-uvicorn", "asgi-granian", "starlette-uvicorn", "fastapi-uvicorn")
_REPLY = msgpack.packb({"session": "s", "action": 1, "log_prob": -1.0, "value": 0.0, "model": "m", "step": 0,
                        "compute_us": 0.0, "latency_us": 0.0, "state": None})


async def bare_app(scope: dict, receive: Any, send: Any) -> None:
    """The candidates' endpoint as a bare ASGI callable: read the body, parse it, answer."""
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if body:
        msgpack.unpackb(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/msgpack"), (b"content-length", str(len(_REPLY)).encode())]})
    await send({"type": "http.response.body", "body": _REPLY})


def _framework_app(kind: str) -> Any:
    if kind.startswith("asgi"):
        return bare_app
    from starlette.requests import Request
    from starlette.responses import Response
    if kind.startswith("starlette"):
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def act(request: Request) -> Response:
            msgpack.unpackb(await request.body())
            return Response(_REPLY, media_type="application/msgpack")

        async def health(request: Request) -> Response:
            return Response(b"{}", media_type="application/json")

        return Starlette(routes=[Route("/v1/act", act, methods=["POST"]), Route("/v1/sessions", act, methods=["POST"]),
                                 Route("/health", health)])
    from fastapi import FastAPI
    app = FastAPI()

    async def act_(request: Request) -> Response:
        msgpack.unpackb(await request.body())
        return Response(_REPLY, media_type="application/msgpack")

    # This module's annotations are strings (PEP 563) that FastAPI resolves in module globals,
    # where Request is not: give it the class itself.
    act_.__annotations__.update(request=Request, response=Response)
    app.post("/v1/act")(act_)
    app.post("/v1/sessions")(act_)

    @app.get("/health")
    async def health_() -> dict:
        return {}

    return app


def _framework_server(kind: str, port: int) -> None:
    import uvicorn
    uvicorn.run(_framework_app(kind), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


def _frameworks(a: argparse.Namespace) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in FRAMEWORKS:
            port = _free_port()
            log = Path(tmp) / f"{kind}.log"
            if kind == "asgi-granian":
                cmd = [str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--port", str(port),
                       "--host", "127.0.0.1", "--loop", "uvloop", "--http", "1", "--workers", "1",
                       "--runtime-threads", "1", "--no-ws", "cogbert_bench.serve:bare_app"]
            else:
                cmd = [sys.executable, "-m", "cogbert_bench.serve", "--peer", kind, "--port", str(port),
                       "--bundle", "-"]
            proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
            try:
                _wait_ready(f"http://127.0.0.1:{port}/health", proc, log, timeout=60)
                sat = _load(f"127.0.0.1:{port}", "cogbert", "http", a, "x", rate=None, name="fw")
                light = _load(f"127.0.0.1:{port}", "cogbert", "http", a, "x", rate=None, name="fw1", connections=1,
                              clients=1)
                rows[kind] = {"requests_per_s": sat["decisions_per_s"], "p99_ms": sat["p99_ms"],
                              "light_p50_us": round(light["p50_ms"] * 1e3, 1) if light["p50_ms"] else None,
                              "errors": sat["errors"]}
            except RuntimeError as e:
                rows[kind] = {"error": str(e)[-300:]}
            finally:
                _stop(proc)
    return {"machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}, "frameworks": rows}


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


def _batch_hist(host: str) -> tuple[float, float]:
    with urllib.request.urlopen(f"http://{host}/metrics", timeout=5) as r:
        text = r.read().decode()
    s = c = 0.0
    for line in text.splitlines():
        if line.startswith("cogbert_decide_batch_size_sum"):
            s = float(line.split()[-1])
        elif line.startswith("cogbert_decide_batch_size_count"):
            c = float(line.split()[-1])
    return s, c


def _measure(host: str, kind: str, transport: str, a: argparse.Namespace, token: str) -> dict:
    def phase(**kw: Any) -> dict:
        before = _batch_hist(host) if kind == "cogbert" else None
        r = _load(host, kind, transport, a, token, **kw)
        if before is not None:
            s, c = _batch_hist(host)
            r["mean_batch"] = round((s - before[0]) / max(c - before[1], 1), 2)
        return r

    # Light load: one connection, one decision at a time (on a WebSocket: one session a message).
    one = argparse.Namespace(**{**vars(a), "ws_group": 1, "ws_inflight": 1})
    light = None
    if kind == "cogbert":
        before = _batch_hist(host)
        light = _load(host, kind, transport, one, token, rate=None, name="light", connections=1, clients=1)
        s, c = _batch_hist(host)
        light["mean_batch"] = round((s - before[0]) / max(c - before[1], 1), 2)
    sat = phase(rate=None, name="sat")
    at = phase(rate=sat["decisions_per_s"] * a.load, name="load") if sat["decisions_per_s"] else sat
    out = {**at, "saturating_decisions_per_s": sat["decisions_per_s"], "saturating_p99_ms": sat["p99_ms"],
           "offered_decisions_per_s": round(sat["decisions_per_s"] * a.load, 1)}
    if light is not None:
        out["server_overhead_us_p50"] = light["server_overhead_us_p50"]
        out["light_p50_ms"] = light["p50_ms"]
        out["light_p99_ms"] = light["p99_ms"]
    return out


def main(a: argparse.Namespace) -> dict:
    if a.frameworks:
        return _frameworks(a)
    transports = [t for t in a.transport.split(",") if t]
    peers = [p for p in a.peers.split(",") if p]
    for t in transports:
        if t not in ("http", "ws"):
            raise SystemExit(f"cogbert-bench: unknown transport {t!r}")
    result: dict = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
                    "settings": {"clients": a.clients, "seconds": a.seconds, "load": a.load,
                                 "connections": a.connections, "ws_connections": a.ws_connections,
                                 "ws_group": a.ws_group, "ws_inflight": a.ws_inflight, "max_wait_us": a.max_wait_us,
                                 "tokens": a.tokens}, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        site = _site(Path(tmp))
        proc, host, _ = _start("cogbert", site, a.max_wait_us)
        try:
            for t in transports:
                result["rows"][f"cogbert-{t}"] = _measure(host, "cogbert", t, a, site["token"])
        finally:
            _stop(proc)
        for peer in peers:
            try:
                proc, host, log = _start(peer, site, 0)
            except (RuntimeError, OSError) as e:
                result["rows"][f"{peer}-http"] = {"error": str(e)[-300:]}
                continue
            try:
                result["rows"][f"{peer}-http"] = _measure(host, peer, "http", a, site["token"])
            finally:
                _stop(proc)
    result["machine"]["load_after"] = os.getloadavg()
    ray = result["rows"].get("ray-http", {})
    ours: dict = max((r for k, r in result["rows"].items() if k.startswith("cogbert")),
                     key=lambda r: r.get("decisions_per_s", 0), default={})
    if ray.get("decisions_per_s"):
        result["vs_ray"] = {"decisions_per_s_ratio": round(ours.get("decisions_per_s", 0) / ray["decisions_per_s"], 2),
                            "p99_ms_ours": ours.get("p99_ms"), "p99_ms_ray": ray.get("p99_ms")}
    return result


def table(result: dict) -> str:
    if "frameworks" in result:
        lines = ["| candidate | requests/s | p99 ms | light p50 µs |", "|---|---|---|---|"]
        for k, r in result["frameworks"].items():
            lines.append(f"| {k} | {r.get('requests_per_s', r.get('error'))} | {r.get('p99_ms')} | "
                         f"{r.get('light_p50_us')} |")
        return "\n".join(lines + [f"load average: {result['machine']['load']}"])
    cols = ["decisions_per_s", "p50_ms", "p99_ms", "server_overhead_us_p50", "mean_batch", "errors",
            "saturating_decisions_per_s"]
    lines = ["| server | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c, r.get("error", ""))) for c in cols) + " |")
    lines.append(f"load average before/after: {result['machine']['load_before']} / {result['machine']['load_after']}")
    if "vs_ray" in result:
        lines.append(f"vs Ray Serve: {result['vs_ray']}")
    return "\n".join(lines)


def _peer_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True, choices=("ray", "fastapi-onnx", *FRAMEWORKS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    a = p.parse_args()
    if a.peer in FRAMEWORKS:
        _framework_server(a.peer, a.port)
    else:
        (_ray_server if a.peer == "ray" else _fastapi_onnx_server)(a.port, a.bundle)


if __name__ == "__main__":
    _peer_main()
