"""``cogbert-bench link``: the mutual-TLS MQTT link against a real Mosquitto on loopback.

Measures the mTLS handshake (TCP + TLS + CONNECT until CONNACK, through ``MqttLink``) and QoS 1
throughput: a device link publishes as fast as its in-flight window (64) allows; ``msgs_per_s``
counts PUBACKed messages. A service link in another process receives on a shared subscription;
``end_to_end_msgs_per_s`` is messages over the time from the first publish to the last receipt.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cogbert_bench._fleet import local_fleet
from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.wire.topics import device_topic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("link", help="mTLS handshake time and QoS 1 throughput through Mosquitto")
    p.add_argument("--connects", type=int, default=50)
    p.add_argument("--payloads", default="1024,65536", help="payload sizes in bytes")
    p.add_argument("--messages", default="8000,800",
                   help="messages per payload size (kept under the broker's per-client queue limits, "
                        "which drop what a slower subscriber cannot take)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with local_fleet(Path(tmp), services=["ingest"], devices=["bench-dev"]) as (pki, broker):
            handshake = _handshakes(broker, pki, args.connects)
            # One row per (size, count) pair; extra entries of the longer list are ignored.
            rows = [_throughput(broker, pki, int(size), int(n))
                    for size, n in zip(args.payloads.split(","), args.messages.split(","), strict=False)]
    return {"suite": "link", "tls": "TLS 1.2+ mutual, ECDSA P-256", "broker": "mosquitto 2.0 (loopback)",
            "handshake_ms": handshake, "qos1": rows}


def _handshakes(broker: LocalBroker, pki: PKI, n: int) -> dict:
    times = []
    for _ in range(n):
        link = MqttLink(LinkSettings.for_device(broker.url, pki.root, "bench-dev"))
        t0 = time.perf_counter()
        link.start()
        link.wait_connected(10)
        times.append(time.perf_counter() - t0)
        link.close()
    ms = np.array(times) * 1e3
    return {"n": n, "p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
            "max": round(float(ms.max()), 2)}


def _subscriber(url: str, pki_root: str, expect: int, ready, out) -> None:
    """A service subscriber in its own process (as ingestion runs): counts until ``expect``."""
    got = 0
    first = last = 0.0
    done = threading.Event()

    def on_msg(_m) -> None:
        nonlocal got, first, last
        last = time.perf_counter()
        first = first or last
        got += 1
        if got >= expect:
            done.set()

    # No persistent session: an offline member of a shared group would keep taking its share.
    link = MqttLink(LinkSettings.for_service(url, Path(pki_root), "ingest", client_id=f"ingest-bench-{os.getpid()}",
                                             session_expiry=0))
    link.start()
    link.subscribe("$share/bench/cogbert/v1/+/+/exp", on_msg).wait(10)
    ready.set()
    done.wait(120)
    out.put((got, time.time(), last - first))
    link.close()


def _throughput(broker: LocalBroker, pki: PKI, size: int, messages: int) -> dict:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_subscriber, args=(broker.service_url, str(pki.root), messages, ready, out))
    proc.start()
    ready.wait(60)
    dev = MqttLink(LinkSettings.for_device(broker.url, pki.root, "bench-dev"))
    dev.start()
    dev.wait_connected(10)
    topic = device_topic("bench", "bench-dev", "exp")
    payload = bytes(size)
    window: list = []
    t0_wall, t0 = time.time(), time.perf_counter()
    for _ in range(messages):
        window.append(dev.publish(topic, payload))
        if len(window) >= 64:          # keep the in-flight window full, never unbounded
            window.pop(0).wait(30)
    for h in window:
        h.wait(30)
    acked = time.perf_counter() - t0
    received, end_wall, _ = out.get(timeout=180)
    proc.join(30)
    dev.close()
    elapsed = end_wall - t0_wall
    return {"payload_bytes": size, "messages": messages,
            "msgs_per_s": round(messages / acked, 1), "mb_per_s": round(messages * size / acked / 1e6, 1),
            "received": received, "end_to_end_msgs_per_s": round(received / elapsed, 1)}


def table(result: dict) -> str:
    h = result["handshake_ms"]
    lines = [f"mTLS handshake (connect to CONNACK): p50 {h['p50']} ms, p95 {h['p95']} ms over {h['n']}",
             f"{'payload':>8} {'msgs':>7} {'msgs/s':>9} {'MB/s':>7}"]
    for r in result["qos1"]:
        lines.append(f"{r['payload_bytes']:>8} {r['messages']:>7} {r['msgs_per_s']:>9.0f} {r['mb_per_s']:>7.1f}")
    return "\n".join(lines)
