"""The outbox: a durable, bounded on-disk spool of records waiting for the cloud's acknowledgement.

Every record gets the next sequence number of this device (1, 2, 3, ... never reused) and is
stored in a *segment* file as one frame:

    u32 length | u32 crc32(seq, payload) | u64 seq | payload

``append`` only frames the record into memory (about a microsecond; no system call on the
decision path, where a ``write`` alone costs several). A writer thread, woken by the first
record of a burst, moves frames to the segment file ``write_interval`` (2 ms) later, in one
write: from then on a kill -9 of the process loses nothing. An idle writer sleeps. It fsyncs
by a count/time policy (``fsync_every`` records or
``fsync_interval`` seconds), which is what protects against power loss; only fsynced records
(``durable_seq``) are handed to the uploader. A crash can thus lose at most the last
``write_interval`` of decisions, which never got to disk; records that did are never lost.
Segments roll at ``segment_bytes``; a segment is deleted once every record in it is
acknowledged (``ack``). The acknowledged prefix is saved in ``state.bin`` (two checksummed
slots, written alternately in place).

Reads (the uploader's) take the newest records from memory (``read_cache_bytes``) and older
ones from the file, through a sparse index of record offsets, checking each record's crc.

Bounds: when the spool exceeds ``max_bytes`` or its oldest segment is older than ``max_age``,
the oldest segment is dropped, acknowledged or not, and its unacknowledged records are counted
in ``dropped_oldest``. A full disk never stops decisions: frames that cannot be written stay in
memory and are retried; past ``max_buffer_bytes`` of unwritten frames (a full or failing
disk, or one slower than the decisions) new records are refused (``append`` returns None, no
sequence number is used) and counted in ``dropped_unwritten``.

Recovery: on open every segment is scanned; a torn or corrupt tail (a frame whose length, crc
or sequence number is wrong) is cut off, so the spool always ends at the last whole record.
"""

from __future__ import annotations

import array
import bisect
import errno
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cogbert_edge._internal.fs import SlotFile, fsync_path
from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError

__all__ = ["Outbox", "OutboxSettings"]

log = logging.getLogger("cogbert.outbox")
FRAME = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
MAX_RECORD = 16 << 20
_STRIDE = 64


@dataclass
class OutboxSettings:
    directory: Path | None = None      # a Device sets it to SPOOL/outbox
    segment_bytes: int = 1 << 20
    max_bytes: int = 256 << 20
    max_age: float = 7 * 24 * 3600.0
    fsync_every: int = 256
    fsync_interval: float = 0.2
    write_interval: float = 0.002
    max_buffer_bytes: int = 8 << 20
    # The newest records are also kept in memory, up to this many bytes, so that an uploader
    # that keeps up reads what was just written without reading it back from the file and
    # checking it (~1.5 µs a record under load). One that falls behind reads the file.
    read_cache_bytes: int = 2 << 20


_IDLE_WAKE = 1.0       # s: an idle writer still wakes this often for housekeeping
_HOUSEKEEPING = 0.1    # s: bounds and the saved state at most this often


@dataclass
class _Segment:
    first: int
    path: Path
    last: int        # last seq in it (first - 1 when empty)
    size: int
    # File offsets of the records first, first + _STRIDE, first + 2 * _STRIDE, ...: a read
    # seeks next to any record and skips fewer than _STRIDE frames, at 8 bytes per _STRIDE
    # records of memory. (Scanning from the segment's start on every read was 57 % of the
    # device-side CPU in the ingest bench.)
    index: array.array = field(default_factory=lambda: array.array("Q"))


class Outbox:
    def __init__(self, settings: OutboxSettings) -> None:
        if settings.directory is None:
            raise ConfigError("OutboxSettings.directory is not set: say where the outbox keeps its files")
        self.s = settings
        self.dir = Path(settings.directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._state = SlotFile(self.dir / "state.bin", 2)     # acked_seq, dropped_oldest
        self.acked_seq, self.dropped_oldest = self._state.values
        self.dropped_unwritten: int = 0
        self.cut_on_recovery: int = 0
        self._acked_ranges: list[tuple[int, int]] = []
        self._segments: list[_Segment] = self._recover()
        self.last_seq = max((seg.last for seg in self._segments), default=self.acked_seq)
        if self.last_seq < self.acked_seq:     # everything was acked and deleted
            self.last_seq = self.acked_seq
        self.written_seq = self.last_seq
        self.durable_seq = self.last_seq        # recovered bytes are fsynced below
        self._fd: int | None = None             # the open (last) segment, writer thread only
        self._frames: list[bytes] = []          # appended, not yet written
        self._buffered_bytes = 0
        self._to_sync: list[int] = []
        self._dir_dirty = False
        self.on_durable: Callable[[], None] | None = None   # called (writer thread) when durable_seq advances
        self._write_errors = 0
        self._closed = False
        self._io = threading.Lock()             # writer-side file work (never taken by append)
        self._wake = threading.Event()
        self._dirty_state = False
        self._last_housekeeping = 0.0
        # Payloads of the records _cache_first .. _cache_next - 1: contiguous, in order, in
        # _cache[_cache_head:]. A list and a head index rather than a deque: the uploader drops
        # a batch's worth at a time, with slices instead of a Python loop of popleft.
        self._cache: list[bytes] = []
        self._cache_head = 0
        self._cache_first = self._cache_next = 0
        self._cache_bytes = 0
        for seg in self._segments:
            fsync_path(seg.path)
        self._writer = threading.Thread(target=self._writer_loop, name="cogbert-outbox-writer", daemon=True)
        self._writer.start()

    # -- the decision path ------------------------------------------------------------------

    def append(self, payload: bytes) -> int | None:
        """Store one record; returns its sequence number, or None if it was refused (the disk
        has been failing and the memory buffer is full, or the outbox is closed)."""
        with self._lock:
            if self._closed or self._buffered_bytes > self.s.max_buffer_bytes:
                self.dropped_unwritten += not self._closed
                return None
            seq = self.last_seq + 1
            first_pending = not self._frames
            self._frames.append(FRAME.pack(len(payload), zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))), seq)
                                + payload)
            self._buffered_bytes += len(payload) + FRAME.size
            self.last_seq = seq
            # Contiguous only: once full, the cache takes new records again after the
            # uploader has read it empty; the records in between come from the file.
            if self._cache_first == self._cache_next:
                self._cache.clear()
                self._cache_head, self._cache_first, self._cache_next = 0, seq, seq
            if seq == self._cache_next and self._cache_bytes + len(payload) <= self.s.read_cache_bytes:
                self._cache.append(payload)
                self._cache_bytes += len(payload)
                self._cache_next = seq + 1
        if first_pending:
            # Only the first record of a burst wakes the writer: an idle device's writer sleeps
            # instead of polling (200 devices polling every 2 ms kept two cores busy in the kernel).
            self._wake.set()
        return seq

    # -- the upload path --------------------------------------------------------------------

    def read(self, first: int, max_records: int, max_bytes: int | None = None) -> list[tuple[int, bytes]]:
        """Durable records ``first, first+1, ...`` as ``(seq, payload)``: at most ``max_records``,
        and no more than ``max_bytes`` of payload unless a single record is larger. Stops at a
        gap (dropped records) or a corrupt record."""
        return list(zip(itertools.count(first), self.read_run(first, max_records, max_bytes)))

    def read_run(self, first: int, max_records: int, max_bytes: int | None = None) -> list[bytes]:
        """The payloads of :meth:`read`: the records ``first, first+1, ...`` (what a batch is
        made of, without a tuple per record)."""
        out: list[bytes] = []
        limit = max_bytes if max_bytes is not None else 1 << 62
        with self._lock:
            last = min(self.durable_seq, first + max_records - 1)
            total, full = self._read_cache(first, last, limit, out)
            seq = first + len(out)
            if full or seq > last:
                return out
            segs = [(seg.first, seg.path, seg.index) for seg in self._segments if seg.last >= seq]
        for seg_first, path, index in segs:
            if seg_first > seq:
                break
            seq, total, full = _read_frames(path, seg_first, index, seq, last, limit, out, total)
            if full or seq > last:
                break
        return out

    def _read_cache(self, first: int, last: int, limit: int, out: list[bytes]) -> tuple[int, bool]:
        """The payloads of records ``first..last`` from the memory cache into ``out`` while their
        bytes stay within ``limit`` (at least one; ``_lock`` held); returns the bytes taken and
        whether ``limit`` stopped it. Reads are sequential, so what lies before ``first`` leaves
        the cache."""
        self._drop_cache_through(first - 1)
        if self._cache_first == self._cache_next or self._cache_first != first or last < first:
            return 0, False
        # At C speed: a Python loop over the records was a tenth of the uploader's time.
        run = self._cache[self._cache_head:self._cache_head + last - first + 1]
        ends = list(itertools.accumulate(map(len, run)))
        count = max(1, bisect.bisect_right(ends, limit))
        out.extend(run[:count] if count < len(run) else run)
        # Full when the next record did not fit. (Testing `total >= limit` instead sent every
        # byte-limited read on to the file, to find that one more record does not fit.)
        return ends[count - 1], count < len(run)

    def _drop_cache_through(self, seq: int) -> None:
        h = self._cache_head
        n = min(seq - self._cache_first + 1, len(self._cache) - h)
        if n <= 0:
            return
        self._cache_bytes -= sum(map(len, self._cache[h:h + n]))
        self._cache_head, self._cache_first = h + n, self._cache_first + n
        if self._cache_head * 2 > len(self._cache):     # amortized: each entry moves at most once
            del self._cache[:self._cache_head]
            self._cache_head = 0

    def iter_from(self, first: int) -> Iterator[tuple[int, bytes]]:
        """Every stored record with seq >= ``first``, in order, durable or not (for tools)."""
        with self._lock:
            segs = [(seg.first, seg.path) for seg in self._segments if seg.last >= first]
        for seg_first, path in segs:
            try:
                data = path.read_bytes()
            except FileNotFoundError:   # dropped meanwhile
                continue
            for seq, start, end in _scan(data, 0, seg_first, first):
                if seq >= first:
                    yield seq, data[start:end]

    def ack(self, first: int, last: int) -> None:
        """The cloud has stored ``first..last``: once every earlier record is acknowledged too,
        they leave the outbox."""
        with self._lock:
            last = min(last, self.last_seq)
            if last < first:
                return
            self._acked_ranges.append((first, last))
            self._acked_ranges.sort()
            merged = []
            for a, b in self._acked_ranges:
                if a <= self.acked_seq + 1:
                    self.acked_seq = max(self.acked_seq, b)
                else:
                    merged.append((a, b))
            self._acked_ranges = [(a, b) for a, b in merged if b > self.acked_seq]
            done = [seg for seg in self._segments[:-1] if seg.last <= self.acked_seq]
            if self._segments and self._segments[-1].last <= self.acked_seq and self._fd is None:
                done.append(self._segments[-1])
            for seg in done:
                self._segments.remove(seg)
            self._dirty_state = True
        for seg in done:
            seg.path.unlink(missing_ok=True)
        if done:
            self._wake.set()

    # -- status -----------------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            size = sum(seg.size for seg in self._segments)
            pending = sum(max(0, seg.last - max(seg.first - 1, self.acked_seq)) for seg in self._segments)
            return {"last_seq": self.last_seq, "written_seq": self.written_seq, "durable_seq": self.durable_seq,
                    "acked_seq": self.acked_seq, "buffered_bytes": self._buffered_bytes,
                    "pending": pending, "bytes": size, "segments": len(self._segments),
                    "dropped_oldest": self.dropped_oldest, "dropped_unwritten": self.dropped_unwritten,
                    "cut_on_recovery": self.cut_on_recovery}

    def flush(self) -> None:
        """Write and fsync every appended record now."""
        with self._io:
            self._write_frames()
            self._sync()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake.set()
        self._writer.join(10)
        with self._io:
            self._write_frames()
            self._sync()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        self._save_state()
        self._state.close()

    # -- internals (the writer thread) ------------------------------------------------------

    def _writer_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            # Sleep until a record arrives, an fsync is due, or housekeeping; then give the burst
            # `write_interval` to gather so that one write carries many records.
            if self.written_seq > self.durable_seq:
                timeout = max(0.0, last_sync + self.s.fsync_interval - time.monotonic())
            else:
                timeout = _IDLE_WAKE
            woken = self._wake.wait(timeout)
            self._wake.clear()
            with self._lock:
                closed = self._closed
            if woken and not closed:
                time.sleep(self.s.write_interval)
            with self._io:
                self._write_frames()
                now = time.monotonic()
                if (self.written_seq - self.durable_seq >= self.s.fsync_every
                        or (self.written_seq > self.durable_seq and now - last_sync >= self.s.fsync_interval)
                        or self._to_sync):
                    self._sync()
                    last_sync = now
            if now - self._last_housekeeping >= _HOUSEKEEPING or closed:
                self._last_housekeeping = now
                self._enforce_bounds()
                if self._dirty_state:
                    self._save_state()
            if closed:
                return

    def _write_frames(self) -> None:
        """Move buffered frames to segment files (writer thread, or close/flush; ``_io`` held)."""
        with self._lock:
            frames, self._frames = self._frames, []
        i = 0
        try:
            while i < len(frames):
                seq = self.written_seq + 1
                fd = self._fd
                if fd is None or self._segments[-1].size >= self.s.segment_bytes:
                    fd = self._roll(seq)
                seg = self._segments[-1]
                # As many frames as fit in this segment (at least one), in one write.
                starts = list(itertools.accumulate(map(len, frames[i:]), initial=seg.size))
                count = max(1, bisect.bisect_right(starts, self.s.segment_bytes) - 1)
                j, size = i + count, starts[count] - seg.size
                n = _writev(fd, frames[i:j])
                if n != size:          # a short write is a full disk: undo the partial bytes
                    os.ftruncate(fd, seg.size)
                    raise OSError(errno.ENOSPC, "short write")
                with self._lock:
                    seg.index.extend(starts[(seg.first - seq) % _STRIDE:count:_STRIDE])
                    seg.size += n
                    seg.last = seq + count - 1
                    self._buffered_bytes -= n
                self.written_seq = seg.last
                i = j
        except OSError as e:
            # Keep what was not written, in order, ahead of anything appended meanwhile.
            with self._lock:
                self._frames[:0] = frames[i:]
            self._write_errors += 1
            if self._write_errors in (1, 10, 100) or self._write_errors % 1000 == 0:
                event(log, "outbox_write_failed", level=logging.ERROR, error=str(e),
                      buffered_bytes=self._buffered_bytes, dropped_unwritten=self.dropped_unwritten)

    def _roll(self, seq: int) -> int:
        """Start the segment whose first record is ``seq``; returns its file descriptor (now ``_fd``)."""
        if self._fd is not None:
            self._to_sync.append(self._fd)
        path = self.dir / f"{seq:016d}.seg"
        self._fd = fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._dir_dirty = True          # the new file's name is durable only after a directory fsync
        with self._lock:
            self._segments.append(_Segment(seq, path, seq - 1, 0))
        return fd

    def _sync(self) -> None:
        seq = self.written_seq
        try:
            for f in self._to_sync:
                os.fsync(f)
                os.close(f)
            self._to_sync = []
            if self._fd is not None and seq > self.durable_seq:
                os.fsync(self._fd)
            # Only a new segment changes the directory; fsyncing it on every sync doubled the
            # journal commits (200 simulated devices: 2,000 a second).
            if self._dir_dirty:
                fsync_path(self.dir)
                self._dir_dirty = False
        except OSError as e:
            event(log, "outbox_fsync_failed", level=logging.ERROR, error=str(e))
            return
        if seq > self.durable_seq:
            self.durable_seq = seq
            if self.on_durable is not None:
                self.on_durable()

    def _enforce_bounds(self) -> None:
        now = time.time()
        dropped = []
        with self._lock:
            while len(self._segments) > 1:
                oldest = self._segments[0]
                total = sum(seg.size for seg in self._segments)
                try:
                    age = now - oldest.path.stat().st_mtime
                except FileNotFoundError:
                    age = 0.0
                if total <= self.s.max_bytes and age <= self.s.max_age:
                    break
                lost = max(0, oldest.last - max(oldest.first - 1, self.acked_seq))
                self.dropped_oldest += lost
                self.acked_seq = max(self.acked_seq, oldest.last)   # gone: nothing to wait for
                self._segments.pop(0)
                self._drop_cache_through(oldest.last)      # dropped means not uploaded
                dropped.append((oldest, lost, "bytes" if total > self.s.max_bytes else "age"))
                self._dirty_state = True
        for seg, lost, why in dropped:
            seg.path.unlink(missing_ok=True)
            event(log, "outbox_dropped_oldest", level=logging.WARNING, segment=seg.path.name, records=lost,
                  reason=why, dropped_oldest=self.dropped_oldest)

    def _recover(self) -> list[_Segment]:
        segs = []
        for path in sorted(self.dir.glob("*.seg")):
            try:
                first = int(path.stem)
            except ValueError:
                continue
            data = path.read_bytes()
            last, end, index = first - 1, 0, array.array("Q")
            for seq, _start, frame_end in _scan(data, 0, first, first):
                if (seq - first) % _STRIDE == 0:
                    index.append(end)
                last, end = seq, frame_end
            if end < len(data):
                self.cut_on_recovery += 1
                event(log, "outbox_torn_tail_cut", level=logging.WARNING, segment=path.name,
                      kept_bytes=end, cut_bytes=len(data) - end)
                with open(path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
            if last < first or last <= self.acked_seq:
                path.unlink()      # empty, or fully acknowledged before the crash
                continue
            segs.append(_Segment(first, path, last, end, index))
        return segs

    @property
    def saved_acked_seq(self) -> int:
        """The acknowledged prefix as last saved: what a restart after a crash would know."""
        return self._state.values[0]

    def _save_state(self) -> None:
        with self._lock:
            acked, dropped = self.acked_seq, self.dropped_oldest
            self._dirty_state = False
        try:
            self._state.save(acked, dropped)
        except OSError as e:   # a full disk: try again next time
            self._dirty_state = True
            event(log, "outbox_state_write_failed", level=logging.ERROR, error=str(e))


def _scan(data: bytes, pos: int, expect: int, verify_from: int) -> Iterator[tuple[int, int, int]]:
    """``(seq, payload start, end)`` of each whole frame from offset ``pos`` on, numbered from
    ``expect``; stops at the first torn, corrupt or misnumbered one. Checksums are checked from
    seq ``verify_from`` on: frames before it are only skipped, by their lengths."""
    view = memoryview(data)
    while pos + FRAME.size <= len(data):
        n, crc, seq = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + n
        if n > MAX_RECORD or seq != expect or end > len(data):
            return
        if seq >= verify_from and zlib.crc32(view[pos + 8:end]) != crc:     # seq and payload are adjacent
            return
        yield seq, pos + FRAME.size, end
        pos, expect = end, seq + 1


def _cut_short(data: bytes, pos: int, expect: int) -> bool:
    """Whether the frame at ``pos`` is whole and valid-looking in the file but not in ``data``
    (a chunk of it): read on from there, rather than stopping at a torn or corrupt frame."""
    if pos + FRAME.size > len(data):
        return True
    n, _crc, seq = FRAME.unpack_from(data, pos)
    return n <= MAX_RECORD and seq == expect and pos + FRAME.size + n > len(data)


def _read_frames(path: Path, seg_first: int, index: array.array, seq: int, last: int, limit: int,
                 out: list[bytes], total: int) -> tuple[int, int, bool]:
    """Append the payloads of records ``seq..last`` of one segment to ``out`` while their bytes
    stay within ``limit``; returns the next seq, the bytes taken and whether ``limit`` stopped
    it. Stops early at the end of the file or at a torn or corrupt frame.

    Reads from the nearest indexed frame, only about as many bytes as the request needs."""
    k = (seq - seg_first) // _STRIDE
    if k >= len(index):
        return seq, total, False
    off, expect = index[k], seg_first + k * _STRIDE
    chunk = max(64 << 10, min(limit, 4 << 20) + (4 << 10))
    try:
        f = open(path, "rb")
    except FileNotFoundError:       # dropped or acknowledged meanwhile
        return seq, total, False
    with f:
        while True:
            f.seek(off)
            data = f.read(chunk)
            pos = 0
            for rec_seq, start, end in _scan(data, 0, expect, seq):
                if rec_seq >= seq:
                    if rec_seq > last or (out and total + end - start > limit):
                        return seq, total, rec_seq <= last
                    out.append(data[start:end])
                    total += end - start
                    seq = rec_seq + 1
                pos, expect = end, rec_seq + 1
            if len(data) < chunk or not _cut_short(data, pos, expect):
                return seq, total, False    # the end of the file, or a torn or corrupt frame
            if pos == 0:                    # a frame larger than the chunk
                chunk = FRAME.size + FRAME.unpack_from(data, 0)[0]
            off += pos


_IOV_MAX = 1024


def _writev(fd: int, frames: list[bytes]) -> int:
    """Write frames without joining them first (a join would hold the GIL that decisions need)."""
    total = 0
    for k in range(0, len(frames), _IOV_MAX):
        part = frames[k:k + _IOV_MAX]
        want = sum(map(len, part))
        n = os.writev(fd, part)
        total += n
        if n != want:
            break
    return total
