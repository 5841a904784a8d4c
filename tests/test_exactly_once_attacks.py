"""Exactly-once that no device can break: a device that resends its own batches with other
timestamps, or sends ranges that overlap what is stored, through a real broker and a real
`cogbert cloud ingest` process. Each ends with `duplicates: 0`, no lost record, and the trainer
reading every record once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.inference.policy import Decision, State
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.wire import batch as codec
from cogbert_edge.wire.records import Record, encode
from cogbert_edge.wire.topics import device_topic

from .helpers import log_tail, spawn_logged

BIN = Path(sys.executable).parent
FLEET, DEV, OBS, HID = "plant", "dev-0", 3, 4


def records(first: int, last: int, *, t0: float = 1.8e9) -> list[tuple[int, bytes]]:
    """Records first..last of one session, one decision a second from t0, a state snapshot on the
    first; step = seq - 1, so consecutive records form one sequence."""
    out = []
    for seq in range(first, last + 1):
        snap = seq == 1
        h = np.full(HID, 0.5, np.float32)
        r = Record("s", seq - 1, np.full(OBS, seq, np.float32), seq % 3, -1.0, 0.5, "m", t0 + seq,
                   h=h if snap else None, c=h if snap else None)
        r.reward = float(seq)
        out.append((seq, encode(r)))
    return out


def batch(first: int, last: int, **kw) -> bytes:
    return codec.encode(DEV, FLEET, records(first, last, **kw), compress=False)


@pytest.fixture
def world(tmp_path):
    pki = PKI.init(tmp_path / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    pki.issue_device(DEV, fleet=FLEET)
    broker = LocalBroker(pki.root, tmp_path / "broker").start()
    w = {"root": tmp_path, "pki": pki, "broker": broker, "store": f"file://{tmp_path / 'store'}", "ingest": None}
    w["ingest"] = start_ingest(w)
    link = MqttLink(LinkSettings.for_device(broker.url, pki.root, DEV, backoff_min=0.05, backoff_max=0.5)).start()
    link.wait_connected(10)
    acks: list[dict] = []
    link.subscribe(device_topic(FLEET, DEV, "ack"), lambda m: acks.append(msgpack.unpackb(m.payload))).wait(5)
    w.update(link=link, acks=acks)
    yield w
    link.close()
    if w["ingest"].poll() is None:
        w["ingest"].send_signal(signal.SIGTERM)
        w["ingest"].wait(10)
    broker.stop()


def start_ingest(w) -> subprocess.Popen:
    stats = w["root"] / f"ingest-{time.monotonic_ns()}.json"
    log = stats.with_suffix(".log")
    p = spawn_logged([str(BIN / "cogbert"), "--log-level", "ERROR", "cloud", "ingest", "--broker",
                      w["broker"].service_url, "--pki", str(w["pki"].root), "--store", w["store"],
                      "--client-id", "ingest-attacks", "--stats-file", str(stats), "--stats-interval", "0.2"], log)
    deadline = time.monotonic() + 15
    while not stats.exists():
        assert p.poll() is None, log_tail(log)
        assert time.monotonic() < deadline, "ingest did not start"
        time.sleep(0.05)
    w["stats"] = stats
    return p


def send(w, payload: bytes, first: int, last: int) -> str:
    """Publish a batch as the device and wait for ingestion's acknowledgement of it."""
    n = len(w["acks"])
    w["link"].publish(device_topic(FLEET, DEV, "exp"), payload).wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for a in w["acks"][n:]:
            if a["batch"] == [first, last]:
                return a["status"]
        time.sleep(0.02)
    raise AssertionError(f"no acknowledgement for {first}-{last}")


def stored(w) -> tuple[dict, np.ndarray]:
    ds = ExperienceDataset(open_store(w["store"]), FLEET)
    seqs = np.concatenate([s.seqs for s in ds.sequences(max_len=10_000)])
    return ds.stats(), seqs


def ingest_stats(w) -> dict:
    time.sleep(0.4)
    return json.loads(w["stats"].read_text())


def test_a_resent_batch_with_its_timestamps_moved_three_days_back_is_stored_once(world):
    assert send(world, batch(1, 9), 1, 9) == "stored"
    assert send(world, batch(10, 19), 10, 19) == "stored"
    assert send(world, batch(10, 19, t0=1.8e9 - 3 * 86400), 10, 19) == "duplicate"
    stats, seqs = stored(world)
    assert (stats["transitions"], stats["duplicates"], stats["batches"]) == (19, 0, 2)
    assert seqs.tolist() == list(range(1, 20))


def test_a_resent_batch_with_its_timestamps_set_to_100_is_stored_once(world):
    assert send(world, batch(1, 19), 1, 19) == "stored"
    assert send(world, batch(1, 19, t0=100.0 - 1), 1, 19) == "duplicate"
    stats, _ = stored(world)
    assert (stats["transitions"], stats["duplicates"]) == (19, 0)


def test_an_overlapping_batch_stores_only_its_new_records_and_nothing_is_lost(world):
    assert send(world, batch(1, 9), 1, 9) == "stored"
    assert send(world, batch(10, 19), 10, 19) == "stored"
    assert send(world, batch(15, 24), 15, 24) == "stored"          # 20-24 are new
    assert send(world, batch(12, 16), 12, 16) == "duplicate"        # inside what is stored
    assert send(world, batch(25, 34), 25, 34) == "stored"           # the device goes on
    stats, seqs = stored(world)
    assert (stats["transitions"], stats["duplicates"], stats["gaps"]) == (34, 0, 0)
    # The trainer reads every record once and in order, 20-24 included (they were lost before).
    assert seqs.tolist() == list(range(1, 35))
    ing = ingest_stats(world)
    assert (ing["accepted"], ing["trimmed"], ing["overlap"]) == (3, 1, 1)
    assert ing["transitions"] == 34


def test_overlaps_are_caught_after_ingestion_restarts_from_what_the_store_holds(world):
    assert send(world, batch(1, 19), 1, 19) == "stored"
    world["ingest"].kill()
    world["ingest"].wait()
    world["ingest"] = start_ingest(world)
    assert send(world, batch(15, 24), 15, 24) == "stored"
    assert send(world, batch(1, 24, t0=5.0), 1, 24) == "duplicate"
    stats, seqs = stored(world)
    assert (stats["transitions"], stats["duplicates"]) == (24, 0)
    assert seqs.tolist() == list(range(1, 25))


def test_the_reader_takes_each_record_once_even_if_the_store_holds_an_overlap(tmp_path):
    # What a race between two replicas could leave (each stored an overlapping batch before the
    # other's write): the trainer still reads each record once, from the batch that starts first.
    store = open_store(f"file://{tmp_path}")
    store.put(f"experience/{FLEET}/{DEV}/{1:016d}-{19:016d}.cbx", batch(1, 19))
    store.put(f"experience/{FLEET}/{DEV}/{15:016d}-{24:016d}.cbx", batch(15, 24))
    ds = ExperienceDataset(store, FLEET)
    assert ds.stats()["duplicates"] == 5
    seqs = np.concatenate([s.seqs for s in ds.sequences(max_len=10_000)])
    assert seqs.tolist() == list(range(1, 25))


def test_a_sliced_batch_round_trips(tmp_path):
    b = codec.decode(batch(1, 19))
    part = b.sliced(5, 12)
    again = codec.decode(codec.encode_batch(part))
    assert (again.first, again.last, again.n) == (5, 12, 8)
    assert np.array_equal(again.obs, b.obs[4:12]) and np.array_equal(again.reward, b.reward[4:12])
    assert again.state_rows.size == 0 and again.sessions == ["s"]
    whole = codec.decode(codec.encode_batch(b.sliced(1, 19)))
    assert whole.state_rows.tolist() == [0] and np.array_equal(whole.state_h, b.state_h)
    with pytest.raises(ValueError):
        b.sliced(0, 5)
