"""The device-cloud contract (cogbert_edge.wire): every message round-trips, every decoder
turns hostile bytes into a WireError and nothing else, the version rule holds, and messages
written by Cogbert 0.1 (tests/fixtures/wire-0.1) are still read in both directions."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogbert_edge.errors import WireError
from cogbert_edge.update.trust import TrustedState
from cogbert_edge.wire import batch as batch_codec
from cogbert_edge.wire.messages import (
    VERSION,
    Ack,
    AgentMessage,
    Chunk,
    OutboxTelemetry,
    ReleaseOffer,
    SiteDecision,
    StatusReport,
    Telemetry,
    UploaderTelemetry,
    decode_release_message,
)
from cogbert_edge.wire.topics import render_topic_map

FIX = Path(__file__).parent / "fixtures" / "wire-0.1"
ROOT = Path(__file__).parents[1]

TELEMETRY = Telemetry(device="dev-1", model="m-1", time=1.8e9, decisions=30, errors=1, nonfinite=0, reward_sum=2.5,
                      reward_count=30, release=4, latency_p95_us=74.5, outbox=OutboxTelemetry(pending=3, bytes=99),
                      uploader=UploaderTelemetry(sent=2, acked=1), link="connected", boot="ab12")
MESSAGES = [
    (Ack(1, 10, "stored"), Ack.decode),
    (Ack(5, 5, "rejected", "bad: schema"), Ack.decode),
    (TELEMETRY, Telemetry.decode),
    (StatusReport.parse("rolled_back:nan_outputs", counter=3, detail="m", time=1.0, device="d", model="m"),
     StatusReport.decode),
    (StatusReport.parse("rejected:bad_signature", detail="m", time=1.0, device="d", model="m", manifest="ab" * 32),
     StatusReport.decode),
    (ReleaseOffer(b"{manifest}", url="file:///x", root_chain=(b"r2", b"r3")), decode_release_message),
    (ReleaseOffer(b"{manifest}", chunks=3), decode_release_message),
    (Chunk("ab" * 32, 2, b"\x00\x01"), decode_release_message),
    (AgentMessage(7, "st-0", 2, True, 0.75, 1, 123), AgentMessage.decode),
    (SiteDecision(7, ("st-0",), ("st-1",), ("st-2",), 456), SiteDecision.decode),
]
DECODERS = {"ack": Ack.decode, "telemetry": Telemetry.decode, "status": StatusReport.decode,
            "release": decode_release_message, "batch": batch_codec.decode, "agent": AgentMessage.decode,
            "site_decision": SiteDecision.decode}


@pytest.mark.parametrize("msg,decode", MESSAGES, ids=lambda x: type(x).__name__ if not callable(x) else "")
def test_every_message_round_trips(msg, decode):
    assert decode(msg.encode()) == msg


def test_status_reports_keep_their_one_string_form():
    s = StatusReport.parse("rejected:hash_mismatch", counter=2)
    assert (s.kind, s.reason, s.status, s.failed, s.installed) == ("rejected", "hash_mismatch",
                                                                    "rejected:hash_mismatch", True, False)
    assert StatusReport.parse("committed").installed and not StatusReport.parse("installed").installed
    with pytest.raises(WireError):
        StatusReport.parse("exploded")


# -- versions and unknown fields --------------------------------------------------------------


def test_unknown_fields_are_ignored_and_a_missing_version_is_version_1():
    d = {**TELEMETRY.to_dict(), "added_in_a_later_release": [1, 2], "outbox": {"pending": 3, "bytes": 99, "new": 1}}
    del d["v"]
    got = Telemetry.decode(json.dumps(d).encode())
    assert got.v == 1 and got.outbox.pending == 3 and got == dataclasses.replace(TELEMETRY, v=1)
    ack = msgpack.packb({"batch": [1, 2], "status": "stored", "reason": "", "extra": 7})
    assert Ack.decode(ack) == Ack(1, 2, "stored")
    decision = msgpack.packb({"step": 3, "granted": ["a"], "denied": [], "missing": [], "sent_ns": 9, "why": "x"})
    assert SiteDecision.decode(decision) == SiteDecision(3, ("a",), (), (), 9)


@pytest.mark.parametrize("kind", ["ack", "telemetry", "status", "release", "agent", "site_decision"])
def test_a_newer_version_is_refused_not_misread(kind):
    newer = VERSION + 1
    payload = {
        "ack": lambda: msgpack.packb({"v": newer, "batch": [1, 2], "status": "stored"}),
        "telemetry": lambda: json.dumps({**TELEMETRY.to_dict(), "v": newer}).encode(),
        "status": lambda: json.dumps({"v": newer, "status": "committed"}).encode(),
        "release": lambda: msgpack.packb({"v": newer, "type": "chunk", "sha256": "a", "index": 0, "data": b""}),
        "agent": lambda: msgpack.packb({**msgpack.unpackb(MESSAGES[-2][0].encode()), "v": newer}),
        "site_decision": lambda: msgpack.packb({**msgpack.unpackb(MESSAGES[-1][0].encode()), "v": newer}),
    }[kind]()
    with pytest.raises(WireError, match="newer"):
        DECODERS[kind](payload)


# -- hostile input ----------------------------------------------------------------------------


HOSTILE = [b"", b"\xc1", b"\x00" * 100, b"[1,2,3]", b'"x"', b"{", b"\xff\xfe", b"null", b"1e999",
           msgpack.packb([1, 2]), msgpack.packb({"batch": "x"}), msgpack.packb({1: 2}),
           msgpack.packb({"batch": [True, 2], "status": "stored"}),
           msgpack.packb({"batch": [5, 1], "status": "stored"}),
           msgpack.packb({"batch": [1, 2], "status": "eaten"}), msgpack.packb({"type": "release"}),
           msgpack.packb({"type": "release", "manifest": b"m", "source": {"kind": "chunks", "count": 10**6}}),
           msgpack.packb({"type": "release", "manifest": b"m", "source": {"kind": "url"}}),
           msgpack.packb({"type": "release", "manifest": "not bytes", "source": {"kind": "url", "url": "x"}}),
           msgpack.packb({"type": "release", "manifest": b"m", "root_chain": [1],
                          "source": {"kind": "url", "url": "x"}}),
           msgpack.packb({"type": "chunk", "sha256": 5, "index": 0, "data": b""}),
           msgpack.packb({"type": "chunk", "sha256": "a", "index": -1, "data": b""}),
           json.dumps({"status": 5}).encode(), json.dumps({"status": "committed", "counter": "7"}).encode(),
           json.dumps({"decisions": -1}).encode(), json.dumps({"outbox": []}).encode(),
           json.dumps({"reward_sum": "lots"}).encode(), b"[" * 100_000 + b"]" * 100_000,
           json.dumps({"x": "y" * 70_000}).encode(), b"\x92" * 50_000]


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("payload", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_payloads_give_a_wire_error_and_nothing_else(kind, payload):
    try:
        DECODERS[kind](payload)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.sampled_from(sorted(DECODERS)))
def test_random_bytes_give_a_wire_error_and_nothing_else(payload, kind):
    try:
        DECODERS[kind](payload)
    except WireError:
        pass


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                            max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Telemetry)] + ["status", "counter"]),
                       _json_values, max_size=8))
def test_well_formed_json_with_wrong_types_gives_a_wire_error(d):
    for decode in (Telemetry.decode, StatusReport.decode):
        try:
            decode(json.dumps(d).encode())
        except WireError:
            pass


_i64 = st.integers(-(2**63), 2**64 - 1)     # what msgpack can carry


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "type", "manifest", "source", "root_chain", "sha256", "index", "data",
                                        "batch", "status", "reason", "step", "agent", "action", "claim",
                                        "sensor", "free", "sent_ns", "granted", "denied", "missing"]),
                       st.none() | _i64 | st.binary(max_size=8) | st.text(max_size=8)
                       | st.lists(_i64 | st.binary(max_size=4), max_size=3)
                       | st.dictionaries(st.sampled_from(["kind", "url", "count"]),
                                         _i64 | st.text(max_size=8) | st.sampled_from(["url", "chunks"])),
                       max_size=6))
def test_well_formed_msgpack_with_wrong_types_gives_a_wire_error(d):
    for decode in (Ack.decode, decode_release_message, AgentMessage.decode, SiteDecision.decode):
        try:
            decode(msgpack.packb(d))
        except WireError:
            pass


# -- Cogbert 0.1 compatibility ----------------------------------------------------------------


def test_what_0_1_devices_send_is_read_by_this_cloud():
    t = Telemetry.decode((FIX / "telemetry.json").read_bytes())
    assert (t.device, t.decisions, t.reward_sum, t.outbox.pending, t.v) == ("dev-7", 30, 30.0, 29, 1)
    s = StatusReport.decode((FIX / "status.json").read_bytes())
    assert s.kind == "rolled_back" and s.reason.startswith("latency") and s.counter == 3 and s.failed
    b = batch_codec.decode((FIX / "batch-1-10.cbx").read_bytes())
    assert (b.first, b.last, b.n) == (1, 10, 10)


def test_what_the_0_1_cloud_sends_is_read_by_this_device():
    assert Ack.decode((FIX / "ack-stored.msgpack").read_bytes()).status == "stored"
    rejected = Ack.decode((FIX / "ack-rejected.msgpack").read_bytes())
    assert rejected.status == "rejected" and rejected.reason
    offer = decode_release_message((FIX / "release-url.msgpack").read_bytes())
    assert isinstance(offer, ReleaseOffer) and offer.url and offer.manifest == (FIX / "manifest.json").read_bytes()
    chunked = decode_release_message((FIX / "release-chunks.msgpack").read_bytes())
    chunk = decode_release_message((FIX / "chunk-0.msgpack").read_bytes())
    assert isinstance(chunked, ReleaseOffer) and chunked.chunks >= 1 and isinstance(chunk, Chunk)
    # and the manifest still verifies against the 0.1 root and names the 0.1 bundle
    import datetime as dt
    trust = TrustedState((FIX / "root.json").read_bytes(), now=dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc))
    release = trust.verify_release(offer.manifest, model=_manifest_model(), fleet=_manifest_fleet(),
                                   highest_counter=0, sdk_format_version=1, sdk_version=(0, 1, 0))
    TrustedState.verify_bundle(release, (FIX / "bundle.safetensors").read_bytes())


def _manifest_signed() -> dict:
    return json.loads((FIX / "manifest.json").read_bytes())["signed"]


def _manifest_model() -> str:
    return _manifest_signed()["model"]


def _manifest_fleet() -> str:
    return _manifest_signed()["fleet"]


def _old_device_reads_ack(payload: bytes) -> tuple[int, int, str]:
    """Cogbert 0.1's uploader, verbatim in what it accepted."""
    ack = msgpack.unpackb(payload, raw=False, max_bin_len=0, max_str_len=256, max_array_len=4, max_map_len=8)
    first, last = ack["batch"]
    assert isinstance(first, int) and isinstance(last, int)
    return first, last, ack["status"]


def _old_device_reads_release(payload: bytes) -> dict:
    """Cogbert 0.1's update agent: the fields it read."""
    msg = msgpack.unpackb(payload, raw=False, max_bin_len=1 << 30, max_str_len=1 << 20, max_array_len=64,
                          max_map_len=16)
    assert msg["type"] in ("release", "chunk")
    return msg


def test_what_this_cloud_sends_is_read_by_0_1_devices():
    assert _old_device_reads_ack(Ack(3, 9, "duplicate").encode()) == (3, 9, "duplicate")
    assert _old_device_reads_ack(Ack(3, 9, "rejected", "x" * 300).encode())[2] == "rejected"
    m = _old_device_reads_release(ReleaseOffer(b"man", url="file:///b", root_chain=(b"r",)).encode())
    assert m["manifest"] == b"man" and m["source"] == {"kind": "url", "url": "file:///b"} and m["root_chain"] == [b"r"]
    m = _old_device_reads_release(ReleaseOffer(b"man", chunks=2).encode())
    assert m["source"] == {"kind": "chunks", "count": 2}
    c = _old_device_reads_release(Chunk("f" * 64, 1, b"d").encode())
    assert (c["sha256"], c["index"], c["data"]) == ("f" * 64, 1, b"d")
    # the 0.1 chunk fixture and this code's encoding of the same chunk carry the same fields
    old = msgpack.unpackb((FIX / "chunk-0.msgpack").read_bytes())
    new = msgpack.unpackb(decode_release_message((FIX / "chunk-0.msgpack").read_bytes()).encode())
    assert {k: v for k, v in new.items() if k != "v"} == old


def test_what_this_device_sends_carries_every_field_the_0_1_cloud_read():
    old = json.loads((FIX / "telemetry.json").read_bytes())
    new = json.loads(TELEMETRY.encode())
    read_by_0_1 = {"decisions", "errors", "nonfinite", "reward_sum", "reward_count", "latency_p95_us", "model",
                   "release", "outbox"}
    assert read_by_0_1 <= set(old) and read_by_0_1 <= set(new) and "pending" in new["outbox"]
    status = json.loads(StatusReport.parse("committed", counter=2, device="d", model="m").encode())
    assert {"status", "counter", "device"} <= set(status)


# -- the topic map in the docs ------------------------------------------------------------------


def test_the_architecture_document_shows_the_topic_map_of_the_code():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    m = re.search(r"<!-- topic-map:begin -->\n```\n(.*?)\n```\n<!-- topic-map:end -->", doc, re.S)
    assert m, "docs/architecture.md has no generated topic map block"
    assert m[1] == render_topic_map(), "regenerate it: python -c 'from cogbert_edge.wire.topics import " \
                                       "render_topic_map; print(render_topic_map())'"
