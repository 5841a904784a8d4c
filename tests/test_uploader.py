"""The uploader on its own, against a recording link: batch ids across restarts, compression."""

from __future__ import annotations

import msgpack
import numpy as np

from cogbert_edge.experience.outbox import Outbox, OutboxSettings
from cogbert_edge.experience.uploader import Uploader, UploaderSettings
from cogbert_edge.link.mqtt import Message
from cogbert_edge.wire import batch as codec
from cogbert_edge.wire.records import Record, encode


class RecordingLink:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> None:
        self.sent.append(payload)

    def subscribe(self, topic_filter: str, callback, *, qos: int = 1) -> None:
        pass


def ack(up: Uploader, first: int, last: int) -> None:
    up._on_ack(Message("ack", msgpack.packb({"batch": [first, last], "status": "stored"}), 1, False, None))


def test_after_a_crash_batches_go_out_again_with_the_ids_they_had(tmp_path, monkeypatch):
    """Acknowledged ranges leave the journal only once the outbox has saved them as
    acknowledged: otherwise a crash between the two re-forms those records into batches
    with new boundaries, which ingestion would store a second time under other ids."""
    ob = Outbox(OutboxSettings(tmp_path))
    for i in range(1200):
        ob.append(encode(Record("s", i, np.full(8, i, np.float32), 1, -1.0, 0.0, "m", 1.8e9 + i)))
    ob.flush()
    ob._save_state()
    saved = ob.saved_acked_seq
    # The crash comes before the outbox saves its state again.
    monkeypatch.setattr(ob, "_save_state", lambda: None)
    link = RecordingLink()
    up = Uploader(ob, link, fleet="f", device="d",
                  settings=UploaderSettings(batch_bytes=1024, window=1000, linger=0.0))
    while up._step():
        pass
    ranges = [(b.first, b.last) for b in map(codec.decode, link.sent)]
    assert len(ranges) >= 64 and ranges[-1][1] == 1200
    for a, b in ranges[:64]:               # the 64th acknowledgement compacts the journal
        ack(up, a, b)
    assert ob.acked_seq == ranges[63][1] and ob.saved_acked_seq == saved == 0
    up.journal.close()
    ob.close()

    ob2 = Outbox(OutboxSettings(tmp_path))
    up2 = Uploader(ob2, RecordingLink(), fleet="f", device="d", settings=UploaderSettings(batch_bytes=1024))
    assert up2._resend == ranges           # every range, as it was first sent
    assert up2._next == 1201               # nothing is formed again
    up2.journal.close()
    ob2.close()


def test_the_uploader_compresses_only_batches_that_pay_and_probes_again(tmp_path):
    ob = Outbox(OutboxSettings(tmp_path))
    up = Uploader(ob, link=None, fleet="f", device="d", settings=UploaderSettings(compress_probe=3))
    rng = np.random.default_rng(1)

    def records(compressible: bool) -> list[bytes]:
        obs = (np.zeros((200, 64)) if compressible else rng.standard_normal((200, 64))).astype(np.float32)
        return [encode(Record("s", i, obs[i], 1, -1.0, 0.0, "m", 1.8e9 + i)) for i in range(200)]

    def codec_of(payloads) -> int:
        return up._fit(1, payloads)[1][4]

    assert codec_of(records(True)) == codec.CODEC_ZLIB
    assert codec_of(records(False)) == codec.CODEC_NONE          # saves < 25 %: sent as it is
    assert [codec_of(records(True)) for _ in range(3)] == [codec.CODEC_NONE] * 3   # not even tried
    assert codec_of(records(True)) == codec.CODEC_ZLIB           # the probe: compressible again
    up.journal.close()
    ob.close()


def test_a_record_that_cannot_be_encoded_leaves_as_a_gap_and_the_rest_go(tmp_path):
    ob = Outbox(OutboxSettings(tmp_path))
    good = [encode(Record("s", i, np.full(8, i, np.float32), 1, -1.0, 0.0, "m", 1.8e9 + i)) for i in range(6)]
    for p in good[:3] + [good[3][:-4]] + good[4:]:       # record 4's length disagrees with its head
        ob.append(p)
    ob.flush()
    link = RecordingLink()
    up = Uploader(ob, link, fleet="f", device="d", settings=UploaderSettings(linger=0.0))
    for _ in range(10):
        up._step()
    assert [(b.first, b.last) for b in map(codec.decode, link.sent)] == [(1, 3), (5, 6)]
    assert up.unencodable == 1
    up.journal.close()
    ob.close()
