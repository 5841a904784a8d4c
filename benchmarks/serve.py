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
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ._serve_load import _load
from ._serve_peers import FRAMEWORKS

__all__ = ["register", "main", "table"]


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
        cmd = [sys.executable, "-m", "cogbert_bench._serve_peers", "--peer", kind, "--port", str(port), "--bundle",
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


def _frameworks(a: argparse.Namespace) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in FRAMEWORKS:
            port = _free_port()
            log = Path(tmp) / f"{kind}.log"
            if kind == "asgi-granian":
                cmd = [str(Path(sys.executable).parent / "granian"), "--interface", "asgi", "--port", str(port),
                       "--host", "127.0.0.1", "--loop", "uvloop", "--http", "1", "--workers", "1",
                       "--runtime-threads", "1", "--no-ws", "cogbert_bench._serve_peers:bare_app"]
            else:
                cmd = [sys.executable, "-m", "cogbert_bench._serve_peers", "--peer", kind, "--port", str(port),
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
