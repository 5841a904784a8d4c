"""Experience records and batches: round trips, and hostile batches rejected with a reason."""

from __future__ import annotations

import struct
import zlib

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogbert_edge.wire import batch as codec
from cogbert_edge.wire.records import DONE, STATE, Record, RecordError, decode, encode


def make_records(n=50, obs_dim=8, hidden=4, continuous=False, start=1):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        snap = i % 16 == 0
        r = Record(session=f"s{i % 3}", step=i, obs=rng.standard_normal(obs_dim).astype(np.float32),
                   action=rng.standard_normal(2).astype(np.float32) if continuous else int(i % 5),
                   log_prob=-1.0 - i, value=0.5 * i, model="m-1" if i < 30 else "m-2", time=1.8e9 + i,
                   reward=float(i), flags=DONE if i == 20 else 0,
                   h=np.full(hidden, i, np.float32) if snap else None,
                   c=np.full(hidden, -i, np.float32) if snap else None)
        out.append((start + i, r))
    return out


def test_record_round_trip_with_and_without_state():
    for _, r in make_records(20, continuous=True):
        back = decode(encode(r))
        assert (back.session, back.step, back.model, back.flags & ~STATE) == (r.session, r.step, r.model, r.flags)
        np.testing.assert_array_equal(back.obs, r.obs)
        np.testing.assert_array_equal(back.action, r.action)
        assert (back.h is None) == (r.h is None)
    with pytest.raises(RecordError):
        decode(encode(make_records(1)[0][1])[:-1])


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("continuous", [True, False])
def test_batch_round_trip_is_columnar_and_exact(compress, continuous):
    recs = make_records(50, continuous=continuous, start=101)
    data = codec.encode("dev-1", "f", [(s, encode(r)) for s, r in recs], compress=compress)
    b = codec.decode(data)
    assert (b.device, b.fleet, b.first, b.last, b.n, b.id) == ("dev-1", "f", 101, 150, 50, "dev-1:101-150")
    assert b.obs.shape == (50, 8)
    for row, (_, r) in enumerate(recs):
        np.testing.assert_array_equal(b.obs[row], r.obs)
        assert b.sessions[b.session_idx[row]] == r.session and b.models[b.model_idx[row]] == r.model
        assert b.step[row] == r.step and b.reward[row] == r.reward and b.log_prob[row] == np.float32(r.log_prob)
        np.testing.assert_array_equal(b.action[row], r.action)
    assert list(b.state_rows) == [0, 16, 32, 48]
    np.testing.assert_array_equal(b.state_h[1], np.full(4, 16, np.float32))
    assert b.flags[20] & DONE and not b.flags[21] & DONE


NAMES = ["s", "unit-7", "unit-12", "é" * 40, "a" + "é" * 40, "a" + "é" * 31 + "Ā" * 5, "x" * 80]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_mix_of_layouts_round_trips_record_by_record(data):
    # Sessions and models of different lengths (cut at 64 bytes, inside a character too),
    # state snapshots anywhere: records of many layouts in one batch.
    n = data.draw(st.integers(1, 40))
    obs_dim, act_dim = data.draw(st.integers(1, 6)), data.draw(st.sampled_from([0, 2]))
    names = st.sampled_from(NAMES)
    recs = []
    for i in range(n):
        snap = data.draw(st.booleans())
        recs.append(encode(Record(data.draw(names), i, np.full(obs_dim, i, np.float32),
                                  np.full(act_dim, -i, np.float32) if act_dim else i % 7, -1.0 * i, 0.5,
                                  data.draw(names), 1.8e9 + i, reward=float(i), flags=data.draw(st.integers(0, 3)),
                                  h=np.full(3, i, np.float32) if snap else None,
                                  c=np.full(3, -i, np.float32) if snap else None)))
    b = codec.decode(codec.encode("d", "f", list(enumerate(recs, start=1)), compress=False))
    state_row = {int(r): k for k, r in enumerate(b.state_rows)}
    for row, raw in enumerate(recs):
        r = decode(raw)
        assert b.sessions[b.session_idx[row]] == r.session and b.models[b.model_idx[row]] == r.model
        assert (b.step[row], b.time[row], b.reward[row], b.flags[row]) == (r.step, r.time, r.reward, r.flags & ~STATE)
        np.testing.assert_array_equal(b.obs[row], r.obs)
        np.testing.assert_array_equal(b.action[row], r.action)
        assert (row in state_row) == (r.h is not None)
        if r.h is not None:
            np.testing.assert_array_equal(b.state_h[state_row[row]], r.h)
            np.testing.assert_array_equal(b.state_c[state_row[row]], r.c)
    assert len(set(b.sessions)) == len(b.sessions) and len(set(b.models)) == len(b.models)


def test_a_record_whose_length_disagrees_with_its_head_is_refused():
    good = encode(make_records(1)[0][1])
    with pytest.raises(ValueError, match="length"):
        codec.encode("d", "f", [(1, good), (2, good + b"\0\0\0\0")])
    with pytest.raises(ValueError, match="shorter than its head"):
        codec.encode("d", "f", [(1, good), (2, good[:10])])


def _body(**changes):
    recs = make_records(10)
    raw = codec.encode("d", "f", [(s, encode(r)) for s, r in recs], compress=False)
    m = msgpack.unpackb(raw[5:], raw=False)
    m.update(changes)
    return codec.MAGIC + b"\0" + msgpack.packb(m, use_bin_type=True)


HOSTILE = {
    "empty": (b"", "bad magic"),
    "random bytes": (b"\x93\x01\xff" * 50, "bad magic"),
    "unknown codec": (codec.MAGIC + b"\x07" + b"x", "unknown codec"),
    "corrupt zlib": (codec.MAGIC + b"\x01" + b"not zlib", "corrupt zlib"),
    "decompression bomb": (codec.MAGIC + b"\x01" + zlib.compress(b"\0" * (64 << 20), 9), "decompresses past"),
    "truncated zlib": (codec.MAGIC + b"\x01" + zlib.compress(b"x" * 1000)[:-4], "truncated"),
    "not msgpack": (codec.MAGIC + b"\0" + b"\xc1\xc1", "not valid msgpack"),
    "msgpack list": (codec.MAGIC + b"\0" + msgpack.packb([1, 2]), "wrong set of fields"),
    "extra field": (_body(evil=1), "wrong set of fields"),
    "wrong type": (_body(n="10"), "must be an integer"),
    "bool for int": (_body(first=True), "must be an integer"),
    "declared n too large": (_body(n=10**9, last=10**9), "does not match"),
    "n does not match range": (_body(last=11), "does not match"),
    "obs shorter than declared": (_body(obs_dim=9), "obs has"),
    "oversized obs_dim": (_body(obs_dim=10**6), "obs_dim must be"),
    "array of wrong type": (_body(reward=[1.0] * 10), "raw bytes"),
    "index outside table": (_body(session_idx=np.full(10, 9, "<u2").tobytes()), "outside its table"),
    "NaN reward": (_body(reward=np.full(10, np.nan, "<f4").tobytes()), "NaN"),
    "unknown flags": (_body(flags=np.full(10, 0x80, "<u1").tobytes()), "unknown flag"),
    "state rows out of order": (_body(state_rows=np.array([5, 0], "<u4").tobytes()), "state_rows"),
    "long device name": (_body(device="x" * 1000), "short string"),
    "huge string table": (_body(sessions=["s"] * 11), "1..n short strings"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_batches_are_rejected_with_a_reason(case):
    data, words = HOSTILE[case]
    with pytest.raises(codec.BatchError, match=words):
        codec.decode(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.data())
def test_any_bytes_decode_or_raise_batch_error(noise, data):
    good = codec.encode("d", "f", [(s, encode(r)) for s, r in make_records(5)], compress=data.draw(st.booleans()))
    kind = data.draw(st.sampled_from(["noise", "mutate", "truncate"]))
    if kind == "noise":
        blob = codec.MAGIC + bytes([data.draw(st.integers(0, 1))]) + noise
    elif kind == "mutate":
        b = bytearray(good)
        for _ in range(data.draw(st.integers(1, 10))):
            b[data.draw(st.integers(5, len(b) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    else:
        blob = good[:data.draw(st.integers(0, len(good)))]
    try:
        codec.decode(blob)
    except codec.BatchError:
        pass


def test_records_of_different_shapes_cannot_share_a_batch():
    a = make_records(2, obs_dim=8)
    b = make_records(1, obs_dim=9, start=3)
    with pytest.raises(ValueError, match="share"):
        codec.encode("d", "f", [(s, encode(r)) for s, r in a + b])
    with pytest.raises(ValueError, match="consecutive"):
        codec.encode("d", "f", [(1, encode(a[0][1])), (3, encode(a[1][1]))])


def test_a_reference_model_batch_fits_128_kib_with_hundreds_of_transitions():
    rng = np.random.default_rng(1)
    recs = [(i + 1, encode(Record("u", i, rng.standard_normal(64).astype(np.float32), 3, -2.0, 0.1, "m", 1.8e9,
                                  h=np.zeros(256, np.float32) if i % 64 == 0 else None,
                                  c=np.zeros(256, np.float32) if i % 64 == 0 else None)))
            for i in range(400)]
    data = codec.encode("d", "f", recs)
    assert len(data) < 128 * 1024
    assert struct.unpack_from("<4s", data)[0] == codec.MAGIC
