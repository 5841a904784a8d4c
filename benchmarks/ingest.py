"""``cogbert-bench ingest``: experience end to end, devices -> mutual-TLS Mosquitto -> ingestion
-> file store, on this machine.

Devices are real :class:`Outbox` + :class:`Uploader` + :class:`MqttLink` stacks, in ``--procs``
processes (2), fed with reference-model records (obs 64, a recurrent-state snapshot every 64
steps) as fast as the pipeline takes them: a producer keeps each device's unacknowledged
backlog under a bound (``--backlog``, 6,000 records: about two upload windows), as a device
whose link keeps up would. Inference is not part of it (``cogbert-bench edge`` measures
that). Ingestion runs as its own process, as deployed. The broker, ingestion and the devices
share the machine's cores.

``transitions_per_s`` counts transitions stored, from the first append until the cloud has
acknowledged the last one; ``lost`` and ``duplicates`` come from reading the store back.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cogbert_bench._fleet import local_fleet
from cogbert_bench._timing import summary_us
from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.experience.outbox import Outbox, OutboxSettings
from cogbert_edge.experience.uploader import Uploader, UploaderSettings
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.wire import batch as batch_codec
from cogbert_edge.wire.records import Record, encode
from cogbert_edge.wire.topics import device_topic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="experience throughput: devices -> broker -> ingestion -> store")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="how long devices produce")
    p.add_argument("--backlog", type=int, default=6000,
                   help="max unacknowledged records per device (about two upload windows of reference records)")
    p.add_argument("--workers", type=int, default=4, help="ingestion worker threads")
    p.add_argument("--compress", action=argparse.BooleanOptionalAction, default=True,
                   help="zlib-compress batches (the uploader's default)")
    p.add_argument("--procs", type=int, default=2, help="processes to run the device stacks in")
    p.add_argument("--replicas", type=int, default=1, help="ingestion processes on one shared subscription")
    p.add_argument("--replay", type=int, default=0, metavar="RECORDS",
                   help="devices send RECORDS transitions as batches encoded before the clock starts "
                        "(measures broker + ingestion + store without the device-side encoding)")
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
        ids = [f"bench-{i:04d}" for i in range(args.devices)]
        store_url = f"file://{root / 'store'}"
        stats_file = root / "ingest-stats.json"
        with local_fleet(root, services=["ingest"], devices=ids,
                         config=BrokerConfig(plugin_in_confdir=False)) as (pki, broker):
            replicas = [subprocess.Popen(
                [sys.executable, "-m", "cogbert_cloud.cli", "--log-level", "WARNING", "cloud", "ingest",
                 "--broker", broker.service_url, "--pki", str(pki.root), "--store", store_url,
                 "--client-id", f"ingest-bench-{r}", "--stats-file", f"{stats_file}.{r}", "--stats-interval", "0.5",
                 "--workers", str(args.workers)],
                stderr=subprocess.DEVNULL) for r in range(args.replicas)]
            while not all(Path(f"{stats_file}.{r}").exists() for r in range(args.replicas)):
                time.sleep(0.05)
            cpu0 = _cpu_seconds([p.pid for p in replicas] + [broker.proc.pid])
            if args.replay:
                result = _replay_devices(args, pki, broker, ids)
            else:
                result = _run_devices(args, pki, broker, root, ids)
            cpu1 = _cpu_seconds([p.pid for p in replicas] + [broker.proc.pid])
            for p in replicas:
                p.terminate()
            for p in replicas:
                p.wait(30)
            per_replica = [json.loads(Path(f"{stats_file}.{r}").read_text()) for r in range(args.replicas)]
            ingest_stats = {k: sum(s.get(k, 0) for s in per_replica) for k in ("bytes", "duplicate", "accepted")}
        stored = ExperienceDataset(open_store(store_url)).stats()
        wall = result["elapsed"]
        cpu = {"devices": round(result["cpu_s"] / wall, 2),
               "ingestion": round(sum(cpu1[p.pid] - cpu0[p.pid] for p in replicas) / wall, 2),
               "broker": round((cpu1[broker.proc.pid] - cpu0[broker.proc.pid]) / wall, 2)}
    produced = result["produced"]
    return {"suite": "ingest", "devices": args.devices, "compress": args.compress,
            "seconds": round(result["elapsed"], 2),
            "transitions": stored["transitions"], "produced": produced,
            "transitions_per_s": round(stored["transitions"] / result["elapsed"], 1),
            "bytes_per_s": round(ingest_stats.get("bytes", 0) / result["elapsed"], 1),
            "lost": produced - stored["transitions"], "duplicates": stored["duplicates"], "gaps": stored["gaps"],
            "batches": stored["batches"], "drained": result["drained"],
            "ingest_duplicate_deliveries": ingest_stats.get("duplicate", 0),
            "mode": "replay" if args.replay else "device stacks", "replicas": args.replicas,
            "replica_batches": [s.get("accepted", 0) for s in per_replica],
            "cores_busy": cpu, "cpu_us_per_transition": {k: round(v * 1e6 / max(stored["transitions"] / wall, 1), 2)
                                                          for k, v in cpu.items()},
            "device_cpu_us_per_transition": {k: round(v * 1e6 / max(stored["transitions"], 1), 2)
                                             for k, v in sorted(result.get("thread_cpu_s", {}).items())},
            "record_bytes": int(np.mean([len(r) for r in reference_records()])),
            "cpu": os.cpu_count()}


def _run_devices(args, pki: PKI, broker: LocalBroker, root: Path, ids: list[str]) -> dict:
    """The device stacks, spread over ``args.procs`` processes (a fleet's devices are separate
    machines; eight in one interpreter share one GIL). The clock runs from the common start
    until the last process has every record acknowledged."""
    job = dict(broker=broker.url, pki=str(pki.root), spool=str(root / "spool"), seconds=args.seconds,
               backlog=args.backlog, compress=args.compress)
    if args.procs <= 1:
        started = threading.Event()   # (in-process: a threading Event; below, a multiprocessing one)
        started.set()
        t0 = time.time()
        r = _device_worker(job, ids, started, None)
        return {"elapsed": r["end"] - t0, "produced": r["produced"], "drained": r["drained"],
                "cpu_s": r["cpu_s"], "thread_cpu_s": r["thread_cpu_s"]}
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    pipes, procs = [], []
    for k in range(args.procs):
        mine = ids[k::args.procs]
        if not mine:
            continue
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=_device_worker, args=(job, mine, go, child), daemon=True))
        pipes.append(parent)
        procs[-1].start()
    for p in pipes:
        if not p.poll(60) or p.recv() != "ready":
            raise RuntimeError("a device process did not start")
    t0 = time.time()
    go.set()
    results = [p.recv() for p in pipes]
    for pr in procs:
        pr.join(30)
    return {"elapsed": max(r["end"] for r in results) - t0, "produced": sum(r["produced"] for r in results),
            "drained": all(r["drained"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results),
            "thread_cpu_s": {k: sum(r["thread_cpu_s"].get(k, 0.0) for r in results)
                             for k in set().union(*(r["thread_cpu_s"] for r in results))}}


def _device_worker(job: dict, ids: list[str], go, conn) -> dict:
    payloads = reference_records()
    stacks = []
    for d in ids:
        ob = Outbox(OutboxSettings(Path(job["spool"]) / d))
        link = MqttLink(LinkSettings.for_device(job["broker"], Path(job["pki"]), d))
        up = Uploader(ob, link, fleet="bench", device=d,
                      settings=UploaderSettings(ack_timeout=10.0, compress=job["compress"]))
        link.start()
        up.start()
        stacks.append((ob, link, up))
    for _, link, _ in stacks:
        link.wait_connected(10)
    if conn is not None:
        conn.send("ready")
    go.wait()
    stop = threading.Event()

    producer_cpu: list[float] = []

    def produce(ob: Outbox) -> None:
        i = 0
        n = len(payloads)
        while not stop.is_set():
            if ob.last_seq - ob.acked_seq >= job["backlog"]:
                time.sleep(0.001)
                continue
            for _ in range(64):
                ob.append(payloads[i % n])
                i += 1
        producer_cpu.append(time.thread_time())

    c0, t0 = time.process_time(), _thread_cpu_seconds()
    threads = [threading.Thread(target=produce, args=(ob,), name="producer", daemon=True) for ob, _, _ in stacks]
    for t in threads:
        t.start()
    time.sleep(job["seconds"])
    stop.set()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(ob.acked_seq >= ob.last_seq for ob, _, _ in stacks):
        time.sleep(0.02)
    threads_cpu = {k: v - t0.get(k, 0.0) for k, v in _thread_cpu_seconds().items()}
    threads_cpu["producer (append)"] = sum(producer_cpu)
    threads_cpu["other"] -= threads_cpu["producer (append)"]
    result = {"end": time.time(), "cpu_s": time.process_time() - c0, "thread_cpu_s": threads_cpu,
              "produced": sum(ob.last_seq for ob, _, _ in stacks),
              "drained": all(ob.acked_seq >= ob.last_seq for ob, _, _ in stacks)}
    for ob, link, up in stacks:
        up.stop()
        link.close()
        ob.close()
    if conn is not None:
        conn.send(result)
    return result


def _replay_devices(args, pki: PKI, broker: LocalBroker, ids: list[str]) -> dict:
    """Each device sends its share of ``args.replay`` records as batches encoded beforehand,
    keeping at most the uploader's window (8) unacknowledged, over its own mutual-TLS link, and
    waits for ingestion's end-to-end acknowledgement of each."""
    payloads = reference_records()
    per_device = args.replay // len(ids)
    rows = batch_codec.estimate_records(float(np.mean([len(p) for p in payloads])) + 16, 128 * 1024)
    batches: dict[str, list[bytes]] = {}
    for d in ids:
        out = batches[d] = []
        for first in range(1, per_device + 1, rows):
            recs = [(q, payloads[(q - 1) % len(payloads)]) for q in range(first, min(first + rows, per_device + 1))]
            out.append(batch_codec.encode(d, "bench", recs, compress=args.compress))
    window, links, done = 8, [], threading.Event()
    acked = {d: 0 for d in ids}
    sems = {d: threading.Semaphore(window) for d in ids}
    lock = threading.Lock()

    def on_ack(d: str):
        def cb(msg) -> None:
            with lock:
                acked[d] += 1
                if all(acked[x] == len(batches[x]) for x in ids):
                    done.set()
            sems[d].release()
        return cb

    for d in ids:
        link = MqttLink(LinkSettings.for_device(broker.url, pki.root, d))
        link.start()
        links.append(link)
    for d, link in zip(ids, links, strict=True):   # one link per device, made above
        link.wait_connected(10)
        link.subscribe(device_topic("bench", d, "ack"), on_ack(d)).wait(10)

    def send(d: str, link: MqttLink) -> None:
        topic = device_topic("bench", d, "exp")
        for data in batches[d]:
            sems[d].acquire()
            link.publish(topic, data, qos=1)

    t0 = time.perf_counter()
    c0 = time.process_time()
    threads = [threading.Thread(target=send, args=(d, link), daemon=True) for d, link in zip(ids, links, strict=True)]
    for t in threads:
        t.start()
    drained = done.wait(300)
    elapsed = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    for link in links:
        link.close()
    return {"elapsed": elapsed, "produced": per_device * len(ids), "drained": drained, "cpu_s": cpu_s}


def _thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by kind (the thread name without its
    device suffix); ``other`` holds the rest of the process's time (threads that have ended)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {"other": time.process_time()}
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else []:
        name = names.get(int(task.name), "other")
        kind = name.split("-bench-")[0] if name.startswith("cogbert-") else name
        cpu = _stat_cpu_seconds(task / "stat")
        out[kind] = out.get(kind, 0.0) + cpu
        out["other"] -= cpu
    return out


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far."""
    return {pid: _stat_cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in pids}


def _stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc stat file (Linux; 0 elsewhere or once gone)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


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
