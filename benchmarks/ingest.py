"""``cogbert-bench ingest``: experience end to end, devices -> mutual-TLS Mosquitto -> ingestion
-> file store, on this machine.

Devices are real :class:`Outbox` + :class:`Uploader` + :class:`MqttLink` stacks in this process,
fed with reference-model records (obs 64, a recurrent-state snapshot every 64 steps) as fast
as the pipeline takes them: a producer keeps each device's unacknowledged backlog under a
bound, as a device whose link keeps up would. Inference is not part of it
(``cogbert-bench edge`` measures that). Ingestion runs as its own process, as deployed. The
broker, ingestion and the devices share the machine's cores.

``transitions_per_s`` counts transitions stored, from the first append until the cloud has
acknowledged the last one; ``lost`` and ``duplicates`` come from reading the store back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cogbert_cloud.broker import BrokerConfig, LocalBroker
from cogbert_cloud.dataset import ExperienceDataset
from cogbert_cloud.pki import PKI
from cogbert_cloud.store import open_store
from cogbert_edge.link import LinkSettings, MqttLink
from cogbert_edge.outbox import Outbox, OutboxSettings
from cogbert_edge.records import Record, encode
from cogbert_edge.uploader import Uploader, UploaderSettings

from ._timing import summary_us


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="experience throughput: devices -> broker -> ingestion -> store")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="how long devices produce")
    p.add_argument("--backlog", type=int, default=20000, help="max unacknowledged records per device")
    p.add_argument("--workers", type=int, default=4, help="ingestion worker threads")
    p.add_argument("--compress", action=argparse.BooleanOptionalAction, default=True,
                   help="zlib-compress batches (the uploader's default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
    o = sub.add_parser("outbox", help="latency of logging a decision (encode + outbox append)")
    o.add_argument("--records", type=int, default=200000)
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=outbox_main)


def reference_records(n: int = 256) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        snap = i % 64 == 0
        out.append(encode(Record("unit-0", i, rng.standard_normal(64).astype(np.float32), int(i % 8), -2.07, 0.13,
                                 "m-0123456789abcdef", 1.8e9 + i, reward=0.5,
                                 h=rng.standard_normal(256).astype(np.float32) if snap else None,
                                 c=rng.standard_normal(256).astype(np.float32) if snap else None)))
    return out


def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = PKI.init(root / "pki")
        pki.issue_server(["localhost"])
        pki.issue_service("ingest")
        ids = [f"bench-{i:04d}" for i in range(args.devices)]
        for d in ids:
            pki.issue_device(d)
        (root / "broker").mkdir()
        store_url = f"file://{root / 'store'}"
        stats_file = root / "ingest-stats.json"
        with LocalBroker(pki.root, root / "broker", config=BrokerConfig(plugin_in_confdir=False)) as broker:
            ingest = subprocess.Popen(
                [sys.executable, "-m", "cogbert_cloud.cli", "--log-level", "WARNING", "cloud", "ingest",
                 "--broker", broker.service_url, "--pki", str(pki.root), "--store", store_url,
                 "--stats-file", str(stats_file), "--stats-interval", "0.5", "--workers", str(args.workers)],
                stderr=subprocess.DEVNULL)
            while not stats_file.exists():
                time.sleep(0.05)
            result = _run_devices(args, pki, broker, root, ids)
            ingest.terminate()
            ingest.wait(30)
            ingest_stats = json.loads(stats_file.read_text())
        stored = ExperienceDataset(open_store(store_url)).stats()
    produced = result["produced"]
    return {"suite": "ingest", "devices": args.devices, "compress": args.compress, "seconds": round(result["elapsed"], 2),
            "transitions": stored["transitions"], "produced": produced,
            "transitions_per_s": round(stored["transitions"] / result["elapsed"], 1),
            "bytes_per_s": round(ingest_stats.get("bytes", 0) / result["elapsed"], 1),
            "lost": produced - stored["transitions"], "duplicates": stored["duplicates"], "gaps": stored["gaps"],
            "batches": stored["batches"], "drained": result["drained"],
            "ingest_duplicate_deliveries": ingest_stats.get("duplicate", 0),
            "record_bytes": int(np.mean([len(r) for r in reference_records()])),
            "cpu": os.cpu_count()}


def _run_devices(args, pki: PKI, broker: LocalBroker, root: Path, ids: list[str]) -> dict:
    payloads = reference_records()
    stacks = []
    for d in ids:
        ob = Outbox(OutboxSettings(root / "spool" / d))
        link = MqttLink(LinkSettings.for_device(broker.url, pki.root, d))
        up = Uploader(ob, link, fleet="bench", device=d, settings=UploaderSettings(ack_timeout=10.0, compress=args.compress))
        link.start()
        up.start()
        stacks.append((ob, link, up))
    for _, link, _ in stacks:
        link.wait_connected(10)
    stop = threading.Event()

    def produce(ob: Outbox) -> None:
        i = 0
        n = len(payloads)
        while not stop.is_set():
            if ob.last_seq - ob.acked_seq >= args.backlog:
                time.sleep(0.001)
                continue
            for _ in range(64):
                ob.append(payloads[i % n])
                i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(ob,), daemon=True) for ob, _, _ in stacks]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(ob.acked_seq >= ob.last_seq for ob, _, _ in stacks):
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    produced = sum(ob.last_seq for ob, _, _ in stacks)
    drained = all(ob.acked_seq >= ob.last_seq for ob, _, _ in stacks)
    for ob, link, up in stacks:
        up.stop()
        link.close()
        ob.close()
    return {"elapsed": elapsed, "produced": produced, "drained": drained}


def outbox_main(args: argparse.Namespace) -> dict:
    """Per-decision cost of logging: encode a reference record and append it, with the writer
    thread writing and fsyncing behind it."""
    rng = np.random.default_rng(0)
    obs = rng.standard_normal(64).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ob = Outbox(OutboxSettings(Path(tmp), max_buffer_bytes=512 << 20))
        payload = reference_records(2)[1]      # a record without a state snapshot, as 63 of 64 are
        append = np.empty(args.records)
        both = np.empty(args.records)
        clock = time.perf_counter
        for i in range(args.records):
            t = clock()
            ob.append(payload)
            append[i] = clock() - t
        r = Record("unit-0", 0, obs, 3, -2.07, 0.13, "m-0123456789abcdef", 1.8e9)
        for i in range(args.records):
            t = clock()
            r.step = i
            ob.append(encode(r))
            both[i] = clock() - t
        ob.close()
        refused = ob.dropped_unwritten
    return {"suite": "outbox", "records": args.records, "append": summary_us(append),
            "encode_and_append": summary_us(both), "refused": refused}


def table(result: dict) -> str:
    if result["suite"] == "outbox":
        a, b = result["append"], result["encode_and_append"]
        return (f"append            p50 {a['p50_us']} µs  p99 {a['p99_us']} µs\n"
                f"encode + append   p50 {b['p50_us']} µs  p99 {b['p99_us']} µs")
    return "\n".join(f"{k:>28}: {v}" for k, v in result.items())
