"""The experience pipeline end to end, with real processes: simulated devices, a real
Mosquitto, ingestion services and an object store (a directory, or S3 through moto's server).
Whatever crashes, every transition a device logged is stored exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker, free_port
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.wire import batch as codec
from cogbert_edge.wire.records import Record, encode
from cogbert_edge.wire.topics import device_topic

from .helpers import log_tail, spawn_logged
from .s3server import s3  # noqa: F401

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    for i in range(6):
        pki.issue_device(f"sim-{i:04d}", fleet="plant")
    cfg = ModelConfig(obs_dim=16, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
    bundle = root / "model.safetensors"
    Bundle.create(cfg, init_params(cfg, 0, policy_gain=1.0)).save(bundle)
    return {"root": root, "pki": pki, "bundle": bundle}


class Ingest:
    """A `cogbert cloud ingest` process."""

    def __init__(self, world, broker, store: str, name: str, env: dict | None = None, metrics_port: int = 0):
        self.stats_file = world["root"] / f"ingest-{name}-{time.monotonic_ns()}.json"
        self.log = self.stats_file.with_suffix(".log")
        self.args = [str(BIN / "cogbert"), "--log-level", "WARNING", "cloud", "ingest", "--broker",
                     broker.service_url, "--pki", str(world["pki"].root), "--store", store, "--client-id",
                     f"ingest-{name}", "--stats-file", str(self.stats_file), "--stats-interval", "0.2",
                     "--metrics-port", str(metrics_port)]
        self.env = {**os.environ, **(env or {})}
        self.proc = None

    def start(self):
        self.proc = spawn_logged(self.args, self.log, env=self.env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not self.stats_file.exists():
            assert self.proc.poll() is None, log_tail(self.log)
            assert time.monotonic() < deadline, "ingest did not start"
            time.sleep(0.05)
        return self

    def stats(self) -> dict:
        return json.loads(self.stats_file.read_text())

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def simulate(world, broker, spool: Path, *, devices=4, steps=2000, rate=0, first=0, ack_timeout=3.0):
    args = [str(BIN / "cogbert"), "--log-level", "WARNING", "device", "simulate", "--devices", str(devices),
            "--steps", str(steps), "--broker", broker.url, "--pki", str(world["pki"].root), "--spool", str(spool),
            "--bundle", str(world["bundle"]), "--fleet", "plant", "--rate", str(rate), "--first-index", str(first),
            "--ack-timeout", str(ack_timeout), "--drain-timeout", "120", "--env", "sensor"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def new_broker(world, name):
    b = LocalBroker(world["pki"].root, world["root"] / f"broker-{name}",
                    config=BrokerConfig(autosave_interval=2, plugin_in_confdir=False))
    return b.start()


def test_every_transition_is_stored_exactly_once_through_crashes_of_everything(world):
    broker = new_broker(world, "crash")
    store = f"file://{world['root'] / 'store-crash'}"
    ingest = Ingest(world, broker, store, "a").start()
    spool = world["root"] / "spool-crash"
    try:
        sim = simulate(world, broker, spool, devices=4, steps=3000, rate=500)
        time.sleep(1.5)
        sim.send_signal(signal.SIGKILL)              # kill -9 the devices mid-upload...
        sim.wait()
        sim = simulate(world, broker, spool, devices=4, steps=3000, rate=500)   # ...and restart them
        time.sleep(1.0)
        broker.restart()                             # graceful broker restart mid-stream
        time.sleep(1.0)
        broker.restart(hard=True)                    # kill -9 of the broker mid-stream
        time.sleep(1.0)
        ingest.kill()                                # kill -9 of ingestion...
        time.sleep(0.5)
        ingest.start()                               # ...and its restart
        summary = finish(sim)
        assert summary["all_drained"] and summary["logged"] == 4 * 3000
        stats = ExperienceDataset(open_store(store)).stats()
        assert stats == {"transitions": 12000, "devices": 4, "batches": stats["batches"], "duplicates": 0,
                         "gaps": 0, "missing": 0}
    finally:
        ingest.stop()
        broker.stop()


class Hostile:
    """A device (its own valid certificate) that, in a thread, sends its records as a
    misbehaving one would: each range, then the same range with its timestamps moved days back
    or set to 100 s, a range overlapping it, one inside it, and garbage."""

    def __init__(self, world, broker, device: str) -> None:
        import threading
        self.device, self.sent_max = device, 0
        self.link = MqttLink(LinkSettings.for_device(broker.url, world["pki"].root, device, backoff_min=0.05,
                                                     backoff_max=0.5)).start()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Hostile:
        self.thread.start()
        return self

    def _run(self) -> None:
        topic, k = device_topic("plant", self.device, "exp"), 0
        while not self._stop.is_set():
            a = 10 * k + 1
            t = 1.8e9 + k
            for payload in (_valid_batch(self.device, a, 10, t=t), _valid_batch(self.device, a, 10, t=t - 3 * 86400),
                            _valid_batch(self.device, a, 10, t=100.0), _valid_batch(self.device, a + 5, 10, t=t),
                            _valid_batch(self.device, a + 2, 3, t=t), os.urandom(200)):
                try:
                    self.link.publish(topic, payload).wait(5)
                except Exception:  # noqa: BLE001 - the broker is being killed: try the next one
                    pass
            self.sent_max = a + 14
            k += 1
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.link.close()


def test_kill_9_of_everything_with_hostile_batches_mixed_in_stores_every_legitimate_transition_once(world):
    broker = new_broker(world, "chaos")
    store = f"file://{world['root'] / 'store-chaos'}"
    ingest = Ingest(world, broker, store, "c").start()
    spool = world["root"] / "spool-chaos"
    hostile = Hostile(world, broker, "sim-0005").start()
    try:
        sim = simulate(world, broker, spool, devices=4, steps=3000, rate=500)
        time.sleep(1.0)
        ingest.kill()                                # kill -9 schedule: ingestion 4x, broker 2x, devices 1x
        ingest.start()
        time.sleep(0.7)
        sim.send_signal(signal.SIGKILL)
        sim.wait()
        sim = simulate(world, broker, spool, devices=4, steps=3000, rate=500)
        time.sleep(0.7)
        broker.restart(hard=True)
        time.sleep(0.7)
        ingest.kill()
        ingest.start()
        time.sleep(0.7)
        broker.restart(hard=True)
        time.sleep(0.7)
        ingest.kill()
        ingest.start()
        time.sleep(0.7)
        ingest.kill()
        time.sleep(0.3)
        ingest.start()
        summary = finish(sim)
        hostile.stop()
        assert summary["all_drained"] and summary["logged"] == 4 * 3000
        ds = ExperienceDataset(open_store(store), "plant")
        stats = ds.stats()
        assert stats["duplicates"] == 0, stats
        index = ds.index()
        for i in range(4):
            ranges = index[("plant", f"sim-{i:04d}")]
            seqs = [s for a, b, _ in ranges for s in range(a, b + 1)]
            assert sorted(seqs) == list(range(1, 3001)), f"sim-{i:04d}: every legitimate transition once"
        # The misbehaving device's own records: whatever of them arrived, each stored once.
        mine = [s for a, b, _ in index.get(("plant", "sim-0005"), []) for s in range(a, b + 1)]
        assert mine and len(mine) == len(set(mine)) and max(mine) <= hostile.sent_max
        assert (ingest.stats()["rejected"] > 0
                and ingest.stats().get("overlap", 0) + ingest.stats().get("trimmed", 0) > 0)
    finally:
        hostile.stop()
        ingest.stop()
        broker.stop()


def test_two_ingestion_replicas_split_the_load_and_store_nothing_twice(world):
    broker = new_broker(world, "replicas")
    store = f"file://{world['root'] / 'store-replicas'}"
    a = Ingest(world, broker, store, "r1").start()
    b = Ingest(world, broker, store, "r2").start()
    try:
        summary = finish(simulate(world, broker, world["root"] / "spool-replicas", devices=4, steps=2000))
        assert summary["all_drained"]
        deadline = time.monotonic() + 10    # the stats files trail the device acks a little
        while a.stats().get("transitions", 0) + b.stats().get("transitions", 0) < 8000 and time.monotonic() < deadline:
            time.sleep(0.1)
        sa, sb = a.stats(), b.stats()
        assert sa.get("accepted", 0) > 0 and sb.get("accepted", 0) > 0, (sa, sb)
        assert sa.get("transitions", 0) + sb.get("transitions", 0) == 8000
        stats = ExperienceDataset(open_store(store)).stats()
        assert (stats["transitions"], stats["duplicates"], stats["gaps"]) == (8000, 0, 0)
    finally:
        a.stop()
        b.stop()
        broker.stop()


def _valid_batch(device: str, first: int, n: int = 5, *, t: float = 1.8e9, **overrides) -> bytes:
    recs = [(first + i, encode(Record("u", i, np.zeros(16, np.float32), 1, -1.0, 0.0, "m", t)))
            for i in range(n)]
    data = codec.encode(device, "plant", recs, compress=False)
    if overrides:
        m = msgpack.unpackb(data[5:], raw=False)
        m.update(overrides)
        data = data[:5] + msgpack.packb(m, use_bin_type=True)
    return data


def test_hostile_payloads_are_rejected_and_counted_and_the_service_keeps_running(world):
    broker = new_broker(world, "hostile")
    store = f"file://{world['root'] / 'store-hostile'}"
    port = free_port()
    ingest = Ingest(world, broker, store, "h", metrics_port=port).start()
    dev = "sim-0005"
    link = MqttLink(LinkSettings.for_device(broker.url, world["pki"].root, dev)).start()
    try:
        link.wait_connected(10)
        topic = device_topic("plant", dev, "exp")
        hostile = [os.urandom(3000), b"", b"CBX1\x00" + msgpack.packb({"n": "lots"}),
                   _valid_batch(dev, 1, obs_dim=10**6),                                # oversized declared length
                   codec.MAGIC + b"\x01" + zlib.compress(b"\0" * (200 << 20), 9),       # decompression bomb
                   _valid_batch("sim-0004", 1),                                         # another device's id
                   _valid_batch(dev, 1, reward=np.full(5, np.inf, "<f4").tobytes())]
        # What a sender writes into a field must not become a counter (or metric label) of its own.
        hostile += [_valid_batch(dev, 1, v=k) for k in range(2, 80)]
        hostile += [_valid_batch(dev, 1, last=k) for k in range(6, 20)]
        for payload in hostile:
            link.publish(topic, payload).wait(10)
        link.publish(topic, _valid_batch(dev, 1)).wait(10)
        deadline = time.monotonic() + 15
        while ((ingest.stats().get("accepted", 0) < 1 or ingest.stats()["rejected"] < len(hostile))
               and time.monotonic() < deadline):
            time.sleep(0.1)
        st = ingest.stats()
        assert st["rejected"] == len(hostile), st["rejected_by_reason"]
        assert st["accepted"] == 1 and ingest.proc.poll() is None
        assert st["rejected_by_reason"]["unsupported batch version"] == 78
        assert st["rejected_by_reason"]["n=N does not match first..last N..N (max N records)"] == 14
        assert ExperienceDataset(open_store(store)).stats()["transitions"] == 5
        # The same counters for Prometheus.
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        assert samples[("cogbert_ingest_batches_total", (("outcome", "stored"),))] == 1
        assert sum(v for (name, _), v in samples.items()
                   if name == "cogbert_ingest_rejected_batches_total") == len(hostile)
        assert samples[("cogbert_ingest_transitions_total", ())] == 5
        assert samples[("cogbert_ingest_broker_connected", ())] == 1
    finally:
        link.close()
        ingest.stop()
        broker.stop()


def test_the_s3_store_path_through_a_real_s3_api(world, s3, monkeypatch):
    for k, v in s3["env"].items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    url = f"s3://fleet/exp?endpoint={s3['endpoint']}"
    broker = new_broker(world, "s3")
    ingest = Ingest(world, broker, url, "s3", env=s3["env"]).start()
    try:
        summary = finish(simulate(world, broker, world["root"] / "spool-s3", devices=2, steps=1500))
        assert summary["all_drained"]
        stats = ExperienceDataset(open_store(url)).stats()
        assert (stats["transitions"], stats["devices"], stats["duplicates"], stats["gaps"]) == (3000, 2, 0, 0)
        keys = list(open_store(url).list("experience/plant/"))
        assert keys and all(k.endswith(".cbx") for k in keys)
    finally:
        ingest.stop()
        broker.stop()
