"""The uploader: moves durable outbox records to the cloud in batches, and deletes them only
when ingestion says they are stored.

- Batches hold consecutive durable records, at most ``batch_bytes`` (128 KiB) on the wire,
  columnar and compressed (:mod:`cogbert_edge.wire.batch`), published with QoS 1 on the device's
  ``exp`` topic.
- Each batch's range is journaled (fsync) *before* it is first sent, so after a restart the
  same batches go out again with the same ids: ingestion deduplicates by id, and a record is
  never stored twice under two different batches.
- A PUBACK only means the broker has it in memory. A batch leaves the outbox when ingestion's
  end-to-end acknowledgement arrives on the device's ``ack`` topic, after a durable write.
  Without one within ``ack_timeout`` it is sent again, with exponential backoff.
- At most ``window`` batches are unacknowledged at a time: memory stays bounded however long
  the link is down, and decisions never wait for the uploader (it runs on its own thread).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from cogbert_edge._internal import trace
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge._internal.log import event
from cogbert_edge.errors import BatchError, LinkError, WireError
from cogbert_edge.experience.outbox import Outbox
from cogbert_edge.link.mqtt import Message, MqttLink
from cogbert_edge.wire import batch as batch_codec
from cogbert_edge.wire.messages import Ack
from cogbert_edge.wire.topics import device_topic

__all__ = ["Uploader", "UploaderSettings", "BatchJournal"]

log = logging.getLogger("cogbert.uploader")

_MAX_IDLE = 1.0     # s: the longest an idle uploader sleeps without a reason to wake


@dataclass
class UploaderSettings:
    batch_bytes: int = 128 * 1024
    window: int = 8
    ack_timeout: float = 15.0
    max_backoff: float = 120.0
    linger: float = 0.05          # wait this long for a batch to fill before sending a small one
    compress: bool = True
    # Send a batch compressed only if that saves this share of its bytes. zlib on float
    # observations saves about a fifth at ~9 µs a record, as much as everything else a record
    # costs on the device; when a batch does not pay, the next `compress_probe` batches go
    # uncompressed without trying.
    min_compression_saving: float = 0.25
    compress_probe: int = 64


class BatchJournal:
    """Ranges of batches formed and not yet acknowledged, durable across restarts."""

    ENTRY = struct.Struct("<QQI")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        if self.path.exists():
            data = self.path.read_bytes()
            for off in range(0, len(data) - self.ENTRY.size + 1, self.ENTRY.size):
                a, b, crc = self.ENTRY.unpack_from(data, off)
                if zlib.crc32(data[off:off + 16]) != crc:
                    break      # torn tail: the batch was never sent, it will be formed again
                self.ranges.append((a, b))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._rewrite_if_torn()

    def _rewrite_if_torn(self) -> None:
        if self.path.stat().st_size != len(self.ranges) * self.ENTRY.size:
            self.compact(0)

    def add(self, first: int, last: int) -> None:
        entry = struct.pack("<QQ", first, last)
        with self._lock:
            os.write(self._fd, entry + struct.pack("<I", zlib.crc32(entry)))
            os.fsync(self._fd)
            self.ranges.append((first, last))

    def compact(self, acked_seq: int) -> None:
        """Forget ranges fully acknowledged (rewrites the file atomically)."""
        with self._lock:
            self.ranges = [(a, b) for a, b in self.ranges if b > acked_seq]
            blob = b"".join(struct.pack("<QQ", a, b) + struct.pack("<I", zlib.crc32(struct.pack("<QQ", a, b)))
                            for a, b in self.ranges)
            os.close(self._fd)
            atomic_write(self.path, blob, mode=0o600)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def close(self) -> None:
        with self._lock:
            os.close(self._fd)


@dataclass
class _InFlight:
    first: int
    last: int
    sent_at: float
    attempts: int


class Uploader:
    def __init__(self, outbox: Outbox, link: MqttLink, *, fleet: str, device: str,
                 settings: UploaderSettings | None = None) -> None:
        self.outbox = outbox
        self.link = link
        self.fleet, self.device = fleet, device
        self.s = settings or UploaderSettings()
        self.journal = BatchJournal(outbox.dir / "batches.journal")
        self._topic = device_topic(fleet, device, "exp")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: dict[int, _InFlight] = {}
        # Journaled but unacknowledged batches from before a restart go out first, as they were.
        self._resend = [(a, b) for a, b in self.journal.ranges if b > outbox.acked_seq]
        self._next = max([outbox.acked_seq] + [b for _, b in self.journal.ranges]) + 1
        self._avg_record = 300.0
        self._partial_since: tuple[int, float] | None = None
        self._skip_compress = 0      # batches to send uncompressed before trying again
        self.sent = self.resent = self.acked = self.rejected = self.duplicates = self.unencodable = 0
        self._thread = threading.Thread(target=self._run, name=f"cogbert-uploader-{device}", daemon=True)

    def start(self) -> Uploader:
        self.outbox.on_durable = self._wake.set
        self.link.subscribe(device_topic(self.fleet, self.device, "ack"), self._on_ack)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.journal.close()

    @property
    def pending_batches(self) -> int:
        with self._lock:
            return len(self._inflight) + len(self._resend)

    def idle(self) -> bool:
        """Everything durable has been sent and acknowledged."""
        with self._lock:
            return not self._inflight and not self._resend and self.outbox.acked_seq >= self.outbox.durable_seq

    # -- the upload thread ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                progressed = self._step()
            except Exception:  # noqa: BLE001 - the uploader must survive any bug and keep trying
                log.exception("uploader step failed", extra={"fields": {"event": "uploader_error",
                                                                          "device": self.device}})
                progressed = False
            if not progressed:
                # Sleep until something can change: new durable records or an ack (both set
                # `_wake`), a partial batch's linger ending, or a resend falling due. Polling
                # every `linger` cost 20 wake-ups a second per idle device.
                self._wake.wait(self._idle_timeout())
                self._wake.clear()

    def _idle_timeout(self) -> float:
        now = time.monotonic()
        t = _MAX_IDLE
        if self._partial_since is not None:
            t = min(t, self._partial_since[1] + self.s.linger - now)
        with self._lock:
            for f in self._inflight.values():
                t = min(t, f.sent_at + self._resend_after(f.attempts) - now)
        return max(t, 0.001)

    def _resend_after(self, attempts: int) -> float:
        return min(self.s.ack_timeout * 2 ** (attempts - 1), self.s.max_backoff)

    def _step(self) -> bool:
        now = time.monotonic()
        with self._lock:
            room = self.s.window - len(self._inflight)
            due = [f for f in self._inflight.values() if now - f.sent_at >= self._resend_after(f.attempts)]
        for f in due:
            self._send(f.first, f.last, attempt=f.attempts + 1)
        if room <= 0:
            return False
        if self._resend:
            a, b = self._resend.pop(0)
            return self._send(a, b, attempt=1) or True
        return self._form_and_send()

    def _form_and_send(self) -> bool:
        first = self._next
        if first > self.outbox.durable_seq:
            return False
        want = batch_codec.estimate_records(self._avg_record, self.s.batch_bytes)
        if self.outbox.durable_seq - first + 1 < want and not self._linger_over(first):
            return False      # not a full batch yet: wait, without reading (reads parse and checksum)
        payloads = self.outbox.read_run(first, want, max_bytes=self.s.batch_bytes)
        if not payloads:
            # A gap: the outbox dropped records (bounds). Skip to what is still there.
            nxt = next(iter(self.outbox.iter_from(first)), None)
            if nxt is None or nxt[0] <= first:
                return False
            self._next = nxt[0]
            return True
        size = sum(map(len, payloads))
        if len(payloads) < want and size < 0.9 * self.s.batch_bytes and not self._linger_over(first):
            return False
        self._partial_since = None
        n = len(payloads)
        try:
            payloads, data = self._fit(first, payloads)
        except BatchError as e:
            # One record that does not encode (only a bug could write one: the outbox checks
            # every record's checksum). Sending it can never succeed; it leaves as a gap.
            event(log, "record_unencodable", level=logging.ERROR, device=self.device, seq=first, error=str(e))
            self.unencodable += 1
            self._next = first + 1
            self.outbox.ack(first, first)
            return True
        if len(payloads) < n:          # trimmed to fit: count only what goes
            size = sum(map(len, payloads))
        last = first + len(payloads) - 1
        self.journal.add(first, last)
        self._next = last + 1
        self._avg_record = 0.8 * self._avg_record + 0.2 * (size / len(payloads))
        return self._send(first, last, attempt=1, data=data)

    def _linger_over(self, first: int) -> bool:
        """A batch starting at ``first`` that is not full may go once it has waited `linger`
        seconds to fill (the clock starts at the first call for this ``first``)."""
        now = time.monotonic()
        if self._partial_since is None or self._partial_since[0] != first:
            self._partial_since = (first, now)
        return now - self._partial_since[1] >= self.s.linger

    def _fit(self, first: int, payloads: list[bytes]) -> tuple[list[bytes], bytes]:
        """Shrink until the encoded batch fits ``batch_bytes`` (and shares one record shape)."""
        while True:
            try:
                data = self._encode(first, payloads)
            except BatchError:       # mixed shapes (a model with another obs size): split
                if len(payloads) == 1:
                    raise
                payloads = payloads[: len(payloads) // 2]
                continue
            if len(data) <= self.s.batch_bytes or len(payloads) == 1:
                return payloads, data
            payloads = payloads[: max(1, int(len(payloads) * self.s.batch_bytes / len(data) * 0.95))]

    def _encode(self, first: int, payloads: list[bytes]) -> bytes:
        """The batch of ``payloads`` from ``first``, compressed when that has been paying."""
        compress = self.s.compress and self._skip_compress == 0
        data = batch_codec.encode_run(self.device, self.fleet, first, payloads, compress=compress,
                                      min_saving=self.s.min_compression_saving)
        if compress and data[4] == batch_codec.CODEC_NONE:
            self._skip_compress = self.s.compress_probe
        elif self._skip_compress:
            self._skip_compress -= 1
        return data

    def _send(self, first: int, last: int, *, attempt: int, data: bytes | None = None) -> bool:
        if data is None:
            payloads = self.outbox.read_run(first, last - first + 1)
            if len(payloads) != last - first + 1:
                # The outbox dropped these records (bounds) before they were acknowledged.
                event(log, "batch_lost_before_ack", level=logging.WARNING, device=self.device,
                      batch=batch_codec.batch_id(self.device, first, last))
                with self._lock:
                    self._inflight.pop(first, None)
                return False
            data = self._encode(first, payloads)
        try:
            # One trace per batch: this span's context rides in MQTT 5 user properties, so that
            # ingestion's spans for the batch are its children (nothing is added without tracing).
            with trace.span("experience.upload", device=self.device, attempt=attempt, records=last - first + 1,
                            batch=batch_codec.batch_id(self.device, first, last), bytes=len(data)):
                props = trace.mqtt_properties()
                if props is None:
                    self.link.publish(self._topic, data, qos=1)
                else:
                    self.link.publish(self._topic, data, qos=1, properties=props)
        except LinkError as e:
            event(log, "batch_publish_failed", level=logging.WARNING, device=self.device, error=str(e))
        with self._lock:
            self._inflight[first] = _InFlight(first, last, time.monotonic(), attempt)
        if attempt == 1:
            self.sent += 1
        else:
            self.resent += 1
        return True

    def _on_ack(self, msg: Message) -> None:
        try:
            ack = Ack.decode(msg.payload)
        except WireError as e:    # a malformed ack is logged and ignored: the batch is sent again
            event(log, "bad_ack", level=logging.WARNING, device=self.device, bytes=len(msg.payload), error=str(e))
            return
        first, last, status = ack.first, ack.last, ack.status
        with self._lock:
            f = self._inflight.get(first)
            if f is None or f.last != last:
                return   # an ack for a batch already acknowledged (duplicate delivery)
            del self._inflight[first]
        if status == "rejected":
            self.rejected += 1
            event(log, "batch_rejected", level=logging.ERROR, device=self.device,
                  batch=batch_codec.batch_id(self.device, first, last), reason=ack.reason[:200])
        elif status == "duplicate":
            self.duplicates += 1
        self.acked += 1
        self.outbox.ack(first, last)
        if self.acked % 64 == 0:
            # Only ranges the outbox has *saved* as acknowledged: after a crash the outbox
            # restarts from its saved state, and a range the journal forgot would then be
            # formed again with other boundaries, a batch id ingestion has not seen.
            self.journal.compact(self.outbox.saved_acked_seq)
        self._wake.set()
