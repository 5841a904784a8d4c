"""Ingestion: stores every experience batch exactly once, then tells the device.

    cogbert cloud ingest --broker mqtts://broker:8884 --pki DIR --store file:///data [--group ingest]

Any number of replicas share the subscription ``$share/GROUP/cogbert/v1/+/+/exp``. For each
message a replica

1. validates the batch (:func:`cogbert_edge.wire.batch.decode`: sizes bounded before allocation,
   decompression capped, every field checked) and that the device and fleet in the payload are
   the ones in the topic (which the broker ties to the device's certificate);
2. stores only records it does not have yet. A batch's identity is (fleet, device, first,
   last), never anything else the sender chooses (such as its timestamps), and so is its key,
   ``experience/{fleet}/{device}/{first:016d}-{last:016d}.cbx``: a redelivered or resent batch
   lands on the same key. The ranges a device has stored are known per device (loaded from the
   store's listing on first sight, so restarts share them, and kept up to date by this
   replica): a batch they already cover is a duplicate and is not written, and one that
   overlaps them is trimmed to its new records (and counted);
3. writes it durably (atomic, fsynced) to the object store;
4. acknowledges it to the device on ``.../ack`` (``stored`` or ``duplicate``), and only then
5. acknowledges the MQTT message (``manual_ack``), so a replica that dies before this point
   leaves the message to be delivered again.

A message that fails validation is counted by reason and dropped (its MQTT message is
acknowledged so it is not delivered again); a batch that decoded but names another device is
also acknowledged to its sender as ``rejected``. The service keeps running.

Several replicas each know the ranges they loaded and stored. A legitimate device never sends
overlapping ranges (it journals each range before sending it), so the exact resends that
replicas do see are caught by the key; an overlapping batch from a misbehaving device that
reaches another replica first could be stored by both, and readers
(:class:`~cogbert_cloud.data.dataset.ExperienceDataset`) take each record once whatever the store
holds.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cogbert_cloud.data import keys
from cogbert_cloud.data.store import ObjectStore, open_store
from cogbert_cloud.errors import StoreError
from cogbert_edge._internal import trace
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge._internal.log import event
from cogbert_edge.link.mqtt import LinkSettings, LinkState, Message, MqttLink
from cogbert_edge.wire import batch as batch_codec
from cogbert_edge.wire.messages import Ack, AckStatus
from cogbert_edge.wire.topics import PREFIX, device_topic, parse_device_topic

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["IngestService", "IngestSettings", "batch_key"]

log = logging.getLogger("cogbert.ingest")
_MAX_REASONS = 64


@dataclass
class IngestSettings:
    broker: str = field(default="mqtts://localhost:8884", metadata={"help": "the broker's service listener"})
    pki: Path = field(default=Path("pki"), metadata={"help": "PKI directory with services/IDENTITY"})
    store: str = field(default="file://./cogbert-store", metadata={"help": "object store URL"})
    group: str = field(default="ingest", metadata={"help": "shared-subscription group"})
    identity: str = field(default="ingest", metadata={"help": "service identity name in the PKI"})
    client_id: str = field(default="", metadata={"help": "stable per replica (default IDENTITY-HOSTNAME), so a "
                                                         "restarted replica resumes its session"})
    session_expiry: int = 600
    workers: int = 4
    max_message_bytes: int = 1 << 20
    stats_file: Path | None = None
    stats_interval: float = 5.0
    metrics_port: int = field(default=0, metadata={"help": "serve Prometheus metrics on this port (0: off)"})


def batch_key(fleet: str, device: str, first: int, last: int) -> str:
    """Where the records ``first..last`` of a device are stored: from the records' identity only."""
    return keys.experience_batch(fleet, device, first, last)




class StoredRanges:
    """Per device, the sequence ranges stored: merged ``[first, last]`` intervals, loaded from
    the store's listing the first time a device is seen and extended by this replica's writes.
    At most ``max_devices`` are kept (least recently used first out; a forgotten device is
    listed again when it comes back)."""

    def __init__(self, store: ObjectStore, max_devices: int = 100_000) -> None:
        self.store, self.max_devices = store, max_devices
        self._ranges: collections.OrderedDict[tuple[str, str], list[list[int]]] = collections.OrderedDict()
        self._lock = threading.Lock()
        # Striped locks: a device's check-store-record runs under one of them, so that two workers
        # never both store overlapping batches of one device.
        self.device_locks = [threading.Lock() for _ in range(64)]

    def lock_for(self, fleet: str, device: str) -> threading.Lock:
        return self.device_locks[hash((fleet, device)) % len(self.device_locks)]

    def missing(self, fleet: str, device: str, first: int, last: int) -> list[tuple[int, int]]:
        """The parts of ``first..last`` that are not stored yet, in order."""
        out, cur = [], first
        for a, b in self._get(fleet, device):
            if b < cur:
                continue
            if a > last:
                break
            if a > cur:
                out.append((cur, a - 1))
            cur = max(cur, b + 1)
            if cur > last:
                break
        if cur <= last:
            out.append((cur, last))
        return out

    def add(self, fleet: str, device: str, first: int, last: int) -> None:
        with self._lock:
            iv = self._ranges.get((fleet, device))
            if iv is not None:
                _insert(iv, first, last)

    def _get(self, fleet: str, device: str) -> list[list[int]]:
        key = (fleet, device)
        with self._lock:
            iv = self._ranges.get(key)
            if iv is not None:
                self._ranges.move_to_end(key)
                return list(iv)
        loaded: list[list[int]] = []
        for k in self.store.list(keys.experience_prefix(fleet, device)):
            where = keys.parse_experience_key(k)
            if where:
                _insert(loaded, where[2], where[3])
        with self._lock:
            iv = self._ranges.setdefault(key, loaded)
            while len(self._ranges) > self.max_devices:
                self._ranges.popitem(last=False)
            return list(iv)


def _insert(iv: list[list[int]], first: int, last: int) -> None:
    """Add ``[first, last]`` to sorted, merged intervals ``iv`` (touching ones merge)."""
    i = 0
    while i < len(iv) and iv[i][1] < first - 1:
        i += 1
    j = i
    while j < len(iv) and iv[j][0] <= last + 1:
        first, last = min(first, iv[j][0]), max(last, iv[j][1])
        j += 1
    iv[i:j] = [[first, last]]


class IngestService:
    def __init__(self, settings: IngestSettings, store: ObjectStore | None = None) -> None:
        self.s = settings
        self.store = store or open_store(settings.store)
        # A stable client id (the pod name in Kubernetes) lets a restarted replica pick up the
        # messages its session kept; a short session expiry frees those of a replica gone for good.
        client_id = settings.client_id or f"{settings.identity}-{socket.gethostname()}"
        self.link = MqttLink(LinkSettings.for_service(settings.broker, settings.pki, settings.identity,
                                                      client_id=client_id, manual_ack=True,
                                                      session_expiry=settings.session_expiry), name=client_id)
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.ranges = StoredRanges(self.store)
        self._queue: queue.Queue = queue.Queue(maxsize=settings.workers * 4)
        self._workers = [threading.Thread(target=self._work, name=f"cogbert-ingest-{i}", daemon=True)
                         for i in range(settings.workers)]
        self._stop = threading.Event()
        self._metrics_server: WSGIServer | None = None
        # Latency histograms (not registered anywhere: _Metrics yields them with the counters).
        self.batch_seconds = Histogram("cogbert_ingest_batch_duration_seconds", "From receiving an experience "
                                       "message to acknowledging it (validate, store, ack)", registry=None,
                                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.store_write_seconds = Histogram("cogbert_ingest_store_write_duration_seconds", "One object store write "
                                             "of a batch", registry=None,
                                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
        # Device clock to store: the oldest record of each batch stored (device clocks may be off).
        self.experience_age_seconds = Histogram("cogbert_ingest_experience_age_seconds", "Age of a stored batch's "
                                                "oldest record: from its decision on the device to stored",
                                                registry=None, buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600,
                                                                        4 * 3600, 24 * 3600))

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> IngestService:
        for w in self._workers:
            w.start()
        self.link.start()
        self.link.subscribe(f"$share/{self.s.group}/{PREFIX}/+/+/exp", self._on_message)
        threading.Thread(target=self._report_loop, name="cogbert-ingest-stats", daemon=True).start()
        if self.s.metrics_port:
            registry = CollectorRegistry()
            registry.register(_Metrics(self))
            self._metrics_server, _ = start_http_server(self.s.metrics_port, registry=registry)
        event(log, "ingest_started", broker=self.s.broker, store=self.store.url, group=self.s.group,
              metrics_port=self.s.metrics_port)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.link.close()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(10)
        self._report()

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters, "rejected": sum(self.rejected.values()),
                    "rejected_by_reason": dict(self.rejected), "link": self.link.state.value,
                    "connected": self.link.state is LinkState.CONNECTED}

    # -- message path -----------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        # Network thread: hand over and return; a full queue holds the link back (backpressure).
        self._queue.put((time.monotonic(), msg))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            received, msg = item
            try:
                # The device's upload span is the parent, if its trace context came along.
                with trace.span("ingest.batch", parent=trace.context_from_properties(msg.properties),
                                topic=msg.topic[:200], bytes=len(msg.payload)):
                    self._handle(msg)
                self.batch_seconds.observe(time.monotonic() - received)
            except StoreError as e:
                # Not stored, not acknowledged: the broker delivers it again after a reconnect,
                # and the device resends it if that does not happen first.
                event(log, "store_failed", level=logging.ERROR, topic=msg.topic, error=str(e)[:300])
                self._count("store_errors")
            except Exception:  # noqa: BLE001 - one bad message must never stop ingestion
                log.exception("ingest failed", extra={"fields": {"event": "ingest_error", "topic": msg.topic}})
                self._count("errors")

    def _handle(self, msg: Message) -> None:
        parsed = parse_device_topic(msg.topic)
        if parsed is None or parsed[2] != "exp":
            return self._reject(msg, None, "bad topic")
        fleet, device, _ = parsed
        if len(msg.payload) > self.s.max_message_bytes:
            return self._reject(msg, (fleet, device), "message too large")
        try:
            b = batch_codec.decode(msg.payload)
        except batch_codec.BatchError as e:
            return self._reject(msg, (fleet, device), str(e))
        if b.device != device or b.fleet != fleet:
            return self._reject(msg, (fleet, device), "device or fleet in the payload differs from the topic",
                                rng=(b.first, b.last))
        stored, exact = 0, False
        with self.ranges.lock_for(fleet, device):
            parts = self.ranges.missing(fleet, device, b.first, b.last)
            if parts == [(b.first, b.last)]:
                key = batch_key(fleet, device, b.first, b.last)
                # The key alone also catches a resend that another replica stored meanwhile.
                if not self.store.exists(key):
                    self._put(key, msg.payload)
                    stored = b.n
                self.ranges.add(fleet, device, b.first, b.last)
            elif not parts:
                # Covered by what is stored: an exact resend, or (from a misbehaving device) a
                # range inside stored ones.
                exact = self.store.exists(batch_key(fleet, device, b.first, b.last))
            else:
                # Overlaps what is stored (a misbehaving device: a legitimate one resends exactly
                # its journaled ranges): keep only the new records, each part under its own key.
                for first, last in parts:
                    self._put(batch_key(fleet, device, first, last), batch_codec.encode_batch(b.sliced(first, last)))
                    self.ranges.add(fleet, device, first, last)
                    stored += last - first + 1
                event(log, "overlapping_batch", level=logging.WARNING, fleet=fleet, device=device, batch=b.id,
                      stored_parts=[list(p) for p in parts])
        status: AckStatus
        if stored == b.n:
            status, outcome = "stored", "accepted"
        elif stored:
            status, outcome = "stored", "trimmed"
        else:
            status, outcome = "duplicate", "duplicate" if exact else "overlap"
            event(log, "duplicate_batch", level=logging.DEBUG, fleet=fleet, device=device, batch=b.id)
        if stored and b.n:
            self.experience_age_seconds.observe(max(0.0, time.time() - float(b.time.min())))
        self._ack_device(fleet, device, b.first, b.last, status)
        msg.ack()
        self._count(outcome, transitions=stored, bytes=len(msg.payload) if stored == b.n else 0)

    def _put(self, key: str, data: bytes) -> None:
        t0 = time.monotonic()
        with trace.span("store.put", key=key, bytes=len(data)):
            self.store.put(key, data)
        self.store_write_seconds.observe(time.monotonic() - t0)

    def _reject(self, msg: Message, who: tuple[str, str] | None, reason: str,
                rng: tuple[int, int] | None = None) -> None:
        # Counted by the fixed part of the reason (before ":", numbers as N), at most
        # _MAX_REASONS of them: the rest of a message can carry what the sender chose, and a
        # counter (and metric label) per distinct value would let a device grow them forever.
        short = re.sub(r"\d+", "N", reason.split(":")[0][:80])
        with self._lock:
            if short not in self.rejected and len(self.rejected) >= _MAX_REASONS:
                short = "other"
            self.rejected[short] += 1
        event(log, "batch_rejected", level=logging.WARNING, topic=msg.topic[:200], reason=reason[:200],
              bytes=len(msg.payload))
        # Only a batch that decoded names a range to acknowledge; for garbage there is none.
        if who is not None and rng is not None:
            self._ack_device(*who, *rng, "rejected", reason=reason[:200])
        msg.ack()

    def _ack_device(self, fleet: str, device: str, first: int, last: int, status: AckStatus, reason: str = "") -> None:
        self.link.publish(device_topic(fleet, device, "ack"), Ack(first, last, status, reason).encode(), qos=1)

    def _count(self, name: str, transitions: int = 0, bytes: int = 0) -> None:
        with self._lock:
            self.counters[name] += 1
            self.counters["transitions"] += transitions
            self.counters["bytes"] += bytes

    def _report_loop(self) -> None:
        while not self._stop.wait(self.s.stats_interval):
            self._report()

    def _report(self) -> None:
        stats = self.stats()
        event(log, "ingest_stats", **{k: v for k, v in stats.items() if k != "rejected_by_reason"})
        if self.s.stats_file:
            atomic_write(Path(self.s.stats_file), json.dumps(stats).encode())


class _Metrics:
    """The service's counters for Prometheus, read from :meth:`IngestService.stats` on each
    scrape (``GET /metrics`` on ``--metrics-port``)."""

    def __init__(self, service: IngestService) -> None:
        self.service = service

    def collect(self):
        st = self.service.stats()
        batches = CounterMetricFamily("cogbert_ingest_batches", "Experience batches acknowledged to devices, "
                                      "by outcome", labels=["outcome"])
        batches.add_metric(["stored"], st.get("accepted", 0))
        batches.add_metric(["duplicate"], st.get("duplicate", 0))
        # A batch overlapping stored records: only its new records stored, or none.
        batches.add_metric(["trimmed"], st.get("trimmed", 0))
        batches.add_metric(["overlap"], st.get("overlap", 0))
        yield batches
        rejected = CounterMetricFamily("cogbert_ingest_rejected_batches", "Messages rejected, by reason",
                                       labels=["reason"])
        for reason, n in sorted(st["rejected_by_reason"].items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily("cogbert_ingest_transitions", "Transitions stored", value=st.get("transitions", 0))
        yield CounterMetricFamily("cogbert_ingest_stored_bytes", "Batch bytes stored", value=st.get("bytes", 0))
        errors = CounterMetricFamily("cogbert_ingest_errors", "Messages not stored for a failure of ours "
                                     "(left unacknowledged: delivered again)", labels=["kind"])
        errors.add_metric(["store"], st.get("store_errors", 0))
        errors.add_metric(["internal"], st.get("errors", 0))
        yield errors
        yield GaugeMetricFamily("cogbert_ingest_broker_connected", "1 while the link to the broker is up",
                                value=int(st["connected"]))
        for h in (self.service.batch_seconds, self.service.store_write_seconds, self.service.experience_age_seconds):
            yield from h.collect()


def run(settings: IngestSettings) -> int:
    svc = IngestService(settings).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    svc.stop()
    return 0
