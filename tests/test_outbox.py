"""The on-device outbox: durable, bounded, recoverable, and never in the way of decisions."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from cogbert_edge._internal.fs import SlotFile
from cogbert_edge.experience.log import ExperienceLog
from cogbert_edge.experience.outbox import Outbox, OutboxSettings
from cogbert_edge.inference.policy import Decision, State
from cogbert_edge.wire.records import DONE, TRUNCATED, decode


def payload(i: int, size: int = 100) -> bytes:
    return i.to_bytes(8, "little") + bytes(size - 8)


def open_outbox(path, **kw) -> Outbox:
    return Outbox(OutboxSettings(path, **kw))


def test_records_get_consecutive_sequence_numbers_and_survive_reopening(tmp_path):
    ob = open_outbox(tmp_path, segment_bytes=4096)
    seqs = [ob.append(payload(i)) for i in range(200)]
    assert seqs == list(range(1, 201))
    ob.flush()
    assert ob.durable_seq == 200 and ob.stats()["segments"] > 1
    ob.close()
    ob = open_outbox(tmp_path, segment_bytes=4096)
    got = ob.read(1, 1000)
    assert [s for s, _ in got] == seqs and all(p == payload(s - 1) for s, p in got)
    assert ob.append(payload(200)) == 201
    ob.close()


def test_records_leave_only_when_acknowledged_in_any_order(tmp_path):
    ob = open_outbox(tmp_path, segment_bytes=1024)
    for i in range(100):
        ob.append(payload(i))
    ob.flush()
    ob.ack(51, 100)                  # a later batch first: nothing may be deleted yet
    assert ob.acked_seq == 0 and ob.stats()["pending"] == 100
    ob.ack(1, 50)
    assert ob.acked_seq == 100 and ob.stats()["pending"] == 0
    assert ob.stats()["segments"] <= 1, "acknowledged segments are deleted"
    ob.close()
    ob = open_outbox(tmp_path, segment_bytes=1024)
    assert ob.acked_seq == 100 and ob.read(1, 10) == [] and ob.append(b"x") == 101
    ob.close()


def test_only_durable_records_are_handed_to_the_uploader(tmp_path):
    ob = open_outbox(tmp_path, fsync_every=10**9, fsync_interval=3600, write_interval=3600)
    ob.append(b"a")
    assert ob.read(1, 10) == [], "not yet fsynced"
    ob.flush()
    assert [s for s, _ in ob.read(1, 10)] == [1]
    ob.close()


@pytest.mark.parametrize("cache", [2 << 20, 0, 3000], ids=["cached", "file only", "cache fills up"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_reads_from_anywhere_return_the_right_records(tmp_path, size, cache):
    # The uploader re-reads inside its last read (a trimmed batch, a lingering partial one),
    # after it (the next batch), before it (a resend) and across segments; from the memory
    # cache, the file, or both in one read. Large records make reads span several chunks of
    # the file, and one record is larger than a chunk.
    scale = 1 if size == "small" else 300
    payloads = {i: f"record-{i}-".encode() * scale * (1 + i % 7) for i in range(1, 601)}
    payloads[333] = b"x" * (300 << 10)
    for segment_bytes in (1 << 20, 4096):       # one segment (when small); many
        ob = Outbox(OutboxSettings(tmp_path / str(segment_bytes), segment_bytes=segment_bytes,
                                   max_buffer_bytes=64 << 20, read_cache_bytes=cache))
        for i in range(1, 601):
            assert ob.append(payloads[i]) == i
            if i % 7 == 0:                      # segments written in many pieces
                ob.flush()
        ob.flush()
        for first, n in ((1, 100), (40, 30), (70, 50), (120, 1), (120, 2), (5, 3), (121, 400), (300, 10),
                         (590, 50), (1, 600), (330, 5)):
            got = ob.read(first, n)
            assert [s for s, _ in got] == list(range(first, min(first + n, 601))), (first, n)
            assert all(p == payloads[s] for s, p in got), (first, n)
        for first in (1, 65, 300, 333, 334):     # by bytes: at least one record, then up to the limit
            got = ob.read(first, 1000, max_bytes=20_000)
            sizes = [len(p) for _, p in got]
            assert got and got[0][0] == first and all(p == payloads[s] for s, p in got)
            assert sum(sizes) <= 20_000 or len(got) == 1
            assert first + len(got) > 600 or sum(sizes) + len(payloads[first + len(got)]) > 20_000
        ob.close()


def test_the_read_cache_never_serves_a_record_under_another_number(tmp_path):
    # A cache that filled up and was partly read must not take records after a gap.
    ob = open_outbox(tmp_path, read_cache_bytes=5 * 100)
    for i in range(10):
        ob.append(payload(i))
    ob.flush()
    assert [s for s, _ in ob.read(4, 1)] == [4]                # frees room for three
    for i in range(10, 20):
        ob.append(payload(i))
    ob.flush()
    for first in (4, 1, 4, 11):
        got = ob.read(first, 100)
        assert [s for s, _ in got] == list(range(first, 21))
        assert all(p == payload(s - 1) for s, p in got)
    ob.close()

def test_a_read_the_cache_can_answer_does_not_touch_the_file(tmp_path, monkeypatch):
    # The uploader's reads are byte-limited (a batch's worth) and the newest records are in
    # memory: going to the file just to find that one more record does not fit doubled the
    # read's cost.
    import cogbert_edge.experience.outbox as outbox_module

    ob = open_outbox(tmp_path)
    for i in range(100):
        ob.append(payload(i))
    ob.flush()
    monkeypatch.setattr(outbox_module, "_read_frames", lambda *a: pytest.fail("read the file"))
    assert [len(p) for p in ob.read_run(1, 50, max_bytes=1050)] == [100] * 10     # stopped by bytes
    assert len(ob.read_run(11, 20)) == 20                                          # by count
    assert len(ob.read_run(31, 1000)) == 70                                        # by durable_seq
    ob.close()



def test_the_acknowledged_prefix_survives_a_torn_state_write(tmp_path):
    state = SlotFile(tmp_path / "state.bin", 2)      # the outbox's: acked_seq, dropped_oldest
    state.save(10, 1)
    state.save(20, 2)                              # into the other slot
    state.close()
    path = tmp_path / "state.bin"
    good = path.read_bytes()
    reopened = SlotFile(path, 2)
    assert reopened.values == (20, 2)
    reopened.close()
    slot = len(good) // 2
    newest = max((0, slot), key=lambda off: int.from_bytes(good[off + 4:off + 12], "little"))
    torn = bytearray(good)
    torn[newest + 14] ^= 0xFF                      # the last write was torn
    path.write_bytes(bytes(torn))
    reopened = SlotFile(path, 2)
    assert reopened.values == (10, 1), "the slot written before it holds"
    reopened.save(30, 3)                           # and the next save replaces the torn one
    reopened.close()
    reopened = SlotFile(path, 2)
    assert reopened.values[0] == 30
    reopened.close()


@pytest.mark.parametrize("damage", ["partial frame", "garbage", "flipped byte in last record"])
def test_a_torn_or_corrupt_tail_is_detected_and_cut(tmp_path, damage):
    ob = open_outbox(tmp_path)
    for i in range(10):
        ob.append(payload(i))
    ob.close()
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    data = seg.read_bytes()
    if damage == "partial frame":
        seg.write_bytes(data + data[-50:])
    elif damage == "garbage":
        seg.write_bytes(data + os.urandom(37))
    else:
        seg.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    ob = open_outbox(tmp_path)
    expect_last = 9 if damage.startswith("flipped") else 10
    assert ob.last_seq == expect_last and ob.stats()["cut_on_recovery"] == 1
    assert [s for s, _ in ob.read(1, 100)] == list(range(1, expect_last + 1))
    assert ob.append(b"next") == expect_last + 1
    ob.close()


def test_kill_9_while_appending_loses_no_written_record(tmp_path):
    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(os.getcwd())!r})
        from cogbert_edge.experience.outbox import Outbox, OutboxSettings
        ob = Outbox(OutboxSettings({str(tmp_path)!r}, segment_bytes=64 * 1024))
        i = 0
        while True:
            ob.append(i.to_bytes(8, "little") * 16)
            i += 1
            if i % 500 == 0:
                print(ob.written_seq, flush=True)
                time.sleep(0.001)
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    written = 0
    for line in p.stdout:
        written = int(line)
        if written > 20000:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    ob = open_outbox(tmp_path, segment_bytes=64 * 1024)
    assert ob.last_seq >= written, "everything written before the kill is still there"
    got = ob.read(1, 10**7)
    assert [s for s, _ in got] == list(range(1, ob.last_seq + 1))
    assert all(p == (s - 1).to_bytes(8, "little") * 16 for s, p in got)
    ob.close()


def test_bounded_by_bytes_with_a_counted_drop_of_the_oldest(tmp_path):
    ob = open_outbox(tmp_path, segment_bytes=2000, max_bytes=10_000)
    for i in range(500):
        ob.append(payload(i))
    ob.flush()
    ob._enforce_bounds()
    st = ob.stats()
    assert st["bytes"] <= 10_000 + 2000
    assert st["dropped_oldest"] > 0
    assert st["dropped_oldest"] + st["pending"] == 500, "every record is either pending or counted as dropped"
    first = ob.read(1, 1)
    assert first == [], "the uploader skips the dropped range"
    remaining = [s for s, _ in ob.iter_from(1)]
    assert remaining == list(range(501 - st["pending"], 501))
    ob.close()


def test_bounded_by_age(tmp_path):
    ob = open_outbox(tmp_path, segment_bytes=1000, max_age=60)
    for i in range(50):
        ob.append(payload(i))
    ob.flush()
    old = time.time() - 3600
    for seg in sorted(tmp_path.glob("*.seg"))[:-1]:
        os.utime(seg, (old, old))
    ob._enforce_bounds()
    assert ob.stats()["dropped_oldest"] > 0 and ob.stats()["segments"] == 1
    ob.close()


def test_a_full_disk_never_stops_decisions_and_is_counted(tmp_path, monkeypatch):
    ob = open_outbox(tmp_path, max_buffer_bytes=5000)
    ob.append(payload(0))
    ob.flush()
    real_writev = os.writev

    def full(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cogbert_edge.experience.outbox.os.writev", full)
    results = [ob.append(payload(i)) for i in range(1, 200)]   # never raises
    time.sleep(0.05)
    accepted = [r for r in results if r is not None]
    assert accepted == list(range(2, 2 + len(accepted))), "refused records use no sequence number"
    assert ob.dropped_unwritten == 199 - len(accepted) > 0
    monkeypatch.setattr("cogbert_edge.experience.outbox.os.writev", real_writev)
    ob.flush()                                   # the disk recovered: buffered records land
    assert [s for s, _ in ob.read(1, 1000)] == [1] + accepted
    ob.close()


def decision(a=1):
    return Decision(a, -0.5, 0.25, State(np.zeros(4, np.float32), np.zeros(4, np.float32)))


def test_rewards_join_the_latest_decision_and_records_close_at_the_next_one(tmp_path):
    ob = open_outbox(tmp_path)
    log = ExperienceLog(ob, model="m-7", snapshot_every=3)
    st = State(np.ones(4, np.float32), np.full(4, 2.0, np.float32))
    obs = np.zeros(5, np.float32)
    log.decision("u", obs, decision(), st)
    log.reward("u", 1.0)
    log.reward("u", 0.5)                     # adds up
    assert ob.last_seq == 0, "still open: more reward may come"
    log.decision("u", obs, decision(), st)   # closes step 0
    log.reward("u", -2.0, done=True)         # closes step 1 at once
    log.decision("u", obs, decision(), st)   # a new episode: step 0 again
    log.decision("v", obs, decision(), st)
    log.flush()
    ob.flush()
    recs = [decode(p) for _, p in ob.read(1, 10)]
    assert [(r.session, r.step, r.reward) for r in recs] == [("u", 0, 1.5), ("u", 1, -2.0), ("u", 0, 0.0),
                                                              ("v", 0, 0.0)]
    assert recs[1].flags & DONE and not recs[0].flags & (DONE | TRUNCATED)
    assert recs[0].h is not None and recs[1].h is None and recs[2].h is not None  # snapshots at step 0
    np.testing.assert_array_equal(recs[0].c, st.c)
    assert all(r.model == "m-7" for r in recs)
    ob.close()


def test_delayed_rewards_within_the_window_and_late_ones_counted(tmp_path):
    ob = open_outbox(tmp_path)
    log = ExperienceLog(ob, model="m", reward_delay=2)
    st = State(np.zeros(4, np.float32), np.zeros(4, np.float32))
    for _ in range(3):
        log.decision("u", np.zeros(2, np.float32), decision(), st)
    log.reward("u", 5.0, step=0)             # still open (window of 3)
    log.decision("u", np.zeros(2, np.float32), decision(), st)   # step 0 is written now
    log.reward("u", 7.0, step=0)             # too late
    assert log.late_rewards == 1
    log.flush()
    ob.flush()
    rewards = [decode(p).reward for _, p in ob.read(1, 10)]
    assert rewards == [5.0, 0.0, 0.0, 0.0]
    ob.close()
