"""Every message between a device and the cloud besides experience (``records``, ``batch``), and
the two between the agents of a multi-agent site and their coordinator.

==============================  =========  =====================  ================
topic (``topics.py``)           direction  message                encoding
==============================  =========  =====================  ================
``.../{device}/ack``            down       :class:`Ack`           msgpack map
``.../{device}/release``,       down       :class:`ReleaseOffer`  msgpack map with
``.../release`` (retained)                 and :class:`Chunk`     ``"type"``
``.../{device}/telemetry``      up         :class:`Telemetry`     JSON object
``.../{device}/status``         up         :class:`StatusReport`  JSON object
``.../_site/{s}/{agent}/msg``   site       :class:`AgentMessage`  msgpack map
``.../_site/{s}/{c}/decision``  site       :class:`SiteDecision`  msgpack map
==============================  =========  =====================  ================

Both sides build and read these messages only through these classes: a field renamed here
is renamed for the sender and the receiver at once, and a field a device counts internally
(an outbox counter, say) reaches the cloud only through a field declared here.

Versions and unknown fields
---------------------------
Every message carries ``"v"``, the version of its layout (:data:`VERSION`). A message without
one is version 1: Cogbert 0.1 wrote none, and its messages are version 1 as they are.
A decoder reads every version up to its own and **ignores fields it does not know**, so a
sender may add a field without a new version, and an older reader is unaffected. A change in
the meaning or type of an existing field bumps the version; a reader refuses a version newer
than its own with :class:`~cogbert_edge.errors.WireError` rather than misreading it.

Every decoder treats its input as hostile: a payload that is not the encoding, is too large,
has the wrong type in a known field or misses a required one raises ``WireError`` (never
anything else), and nothing is read beyond the limits below.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import msgpack

from cogbert_edge.errors import WireError

__all__ = [
    "VERSION",
    "Ack",
    "AckStatus",
    "Telemetry",
    "OutboxTelemetry",
    "UploaderTelemetry",
    "StatusReport",
    "UpdateStatus",
    "ReleaseOffer",
    "Chunk",
    "decode_release_message",
    "AgentMessage",
    "SiteDecision",
]

VERSION = 1

AckStatus = Literal["stored", "duplicate", "rejected"]
_ACK_STATUSES = ("stored", "duplicate", "rejected")

# What an update agent reports: the step a release reached, or why it stopped. "rejected" and
# "rolled_back" carry a reason (``rejected:hash_mismatch``, ``rolled_back:nan_outputs``).
UpdateStatus = Literal["installed", "trial", "committed", "already_installed", "rejected", "rolled_back"]
_UPDATE_STATUSES = ("installed", "trial", "committed", "already_installed", "rejected", "rolled_back")

_MAX_JSON = 64 * 1024             # telemetry and status reports are a few hundred bytes
_MAX_STR = 300
_MAX_ACK_REASON = 200             # Cogbert 0.1 devices refuse acks with a string over 256
_MAX_MANIFEST = 1 << 20
_MAX_ROOTS = 64
_MAX_CHUNK = 1 << 30


# -- field checks shared by the decoders --------------------------------------------------------


def _int(d: dict, key: str, default: int | None = None, *, lo: int = 0) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise WireError(f"field {key!r} must be an integer >= {lo}, got {_show(v)}")
    return v


def _opt_int(d: dict, key: str) -> int | None:
    return None if d.get(key) is None else _int(d, key)


def _num(d: dict, key: str, default: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WireError(f"field {key!r} must be a number, got {_show(v)}")
    return float(v)


def _opt_num(d: dict, key: str) -> float | None:
    return None if d.get(key) is None else _num(d, key)


def _str(d: dict, key: str, default: str | None = None, *, limit: int = _MAX_STR) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise WireError(f"field {key!r} must be a string, got {_show(v)}")
    return v[:limit]


def _show(v: object) -> str:
    return "nothing" if v is None else type(v).__name__


def _version(d: dict, what: str) -> int:
    v = _int(d, "v", 1, lo=1)
    if v > VERSION:
        raise WireError(f"{what} of version {v} is newer than this code reads (up to {VERSION}): upgrade it")
    return v


def _json_object(payload: bytes, what: str) -> dict:
    if len(payload) > _MAX_JSON:
        raise WireError(f"{what} of {len(payload)} bytes is over the {_MAX_JSON}-byte limit")
    try:
        d = json.loads(payload)
    except (ValueError, RecursionError) as e:     # UnicodeDecodeError is a ValueError
        raise WireError(f"{what} is not JSON: {str(e)[:80]}") from None
    if not isinstance(d, dict):
        raise WireError(f"{what} must be a JSON object, got {_show(d)}")
    return d


def _msgpack_map(payload: bytes, what: str, **limits: int) -> dict:
    try:
        d = msgpack.unpackb(payload, raw=False, strict_map_key=True, **limits)
    except (ValueError, msgpack.UnpackException, TypeError) as e:
        raise WireError(f"{what} is not msgpack: {str(e)[:80]}") from None
    if not isinstance(d, dict):
        raise WireError(f"{what} must be a msgpack map, got {_show(d)}")
    return d


def _dumps(obj: dict) -> bytes:
    # allow_nan: a device may report a non-finite reward sum; readers check isfinite.
    return json.dumps(obj, separators=(",", ":")).encode()


# -- ack (cloud -> device) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ack:
    """Ingestion's end-to-end acknowledgement of the batch ``first..last`` of one device."""

    first: int
    last: int
    status: AckStatus
    reason: str = ""
    v: int = VERSION

    def __post_init__(self) -> None:
        if self.status not in _ACK_STATUSES:
            raise WireError(f"ack status must be one of {_ACK_STATUSES}, got {self.status!r}")
        if self.last < self.first:
            raise WireError(f"ack range {self.first}..{self.last} is empty")

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.v, "batch": [self.first, self.last], "status": self.status,
                              "reason": self.reason[:_MAX_ACK_REASON]})

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        d = _msgpack_map(payload, "ack", max_bin_len=0, max_str_len=_MAX_STR, max_array_len=4, max_map_len=16,
                         max_ext_len=0)
        v = _version(d, "ack")
        rng = d.get("batch")
        if not (isinstance(rng, list) and len(rng) == 2):
            raise WireError(f"ack field 'batch' must be [first, last], got {_show(rng)}")
        first, last = _int({"first": rng[0]}, "first"), _int({"last": rng[1]}, "last")
        status = _str(d, "status")
        if status not in _ACK_STATUSES:
            raise WireError(f"ack status must be one of {_ACK_STATUSES}, got {status[:20]!r}")
        reason = d.get("reason")
        return cls(first, last, status, reason[:_MAX_STR] if isinstance(reason, str) else "", v)  # type: ignore[arg-type]


# -- telemetry (device -> cloud) ----------------------------------------------------------------


@dataclass(frozen=True)
class OutboxTelemetry:
    """The experience outbox as the cloud sees it (not the outbox's internal counters)."""

    pending: int = 0              # records not yet acknowledged by the cloud
    bytes: int = 0                # bytes on disk
    segments: int = 0
    last_seq: int = -1
    acked_seq: int = -1
    dropped_oldest: int = 0       # records dropped to stay within the spool's size
    dropped_unwritten: int = 0

    @classmethod
    def from_dict(cls, d: object) -> OutboxTelemetry:
        if not isinstance(d, dict):
            raise WireError(f"telemetry field 'outbox' must be an object, got {_show(d)}")
        return cls(pending=_int(d, "pending", 0), bytes=_int(d, "bytes", 0), segments=_int(d, "segments", 0),
                   last_seq=_int(d, "last_seq", -1, lo=-1), acked_seq=_int(d, "acked_seq", -1, lo=-1),
                   dropped_oldest=_int(d, "dropped_oldest", 0), dropped_unwritten=_int(d, "dropped_unwritten", 0))


@dataclass(frozen=True)
class UploaderTelemetry:
    sent: int = 0
    resent: int = 0
    acked: int = 0
    rejected: int = 0

    @classmethod
    def from_dict(cls, d: object) -> UploaderTelemetry:
        if not isinstance(d, dict):
            raise WireError(f"telemetry field 'uploader' must be an object, got {_show(d)}")
        return cls(**{f.name: _int(d, f.name, 0) for f in fields(cls)})


@dataclass(frozen=True)
class Telemetry:
    """What a device reports every ``telemetry_interval`` seconds. Counters are cumulative since
    the device process started (``boot`` tells restarts apart)."""

    device: str
    model: str
    time: float
    decisions: int = 0
    errors: int = 0
    nonfinite: int = 0
    reward_sum: float = 0.0
    reward_count: int = 0
    sanitized: int = 0
    swaps: int = 0
    state_resets: int = 0
    release: int | None = None
    latency_p95_us: float | None = None
    outbox: OutboxTelemetry = field(default_factory=OutboxTelemetry)
    uploader: UploaderTelemetry = field(default_factory=UploaderTelemetry)
    late_rewards: int = 0
    refused_records: int = 0
    link: str = ""
    boot: str = ""                # random per device process: a new value means counters restarted
    v: int = VERSION

    def encode(self) -> bytes:
        return _dumps(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["outbox"] = {f.name: getattr(self.outbox, f.name) for f in fields(self.outbox)}
        d["uploader"] = {f.name: getattr(self.uploader, f.name) for f in fields(self.uploader)}
        return d

    @classmethod
    def decode(cls, payload: bytes) -> Telemetry:
        return cls.from_dict(_json_object(payload, "telemetry"))

    @classmethod
    def from_dict(cls, d: dict) -> Telemetry:
        v = _version(d, "telemetry")
        return cls(device=_str(d, "device", ""), model=_str(d, "model", ""), time=_num(d, "time", 0.0),
                   decisions=_int(d, "decisions", 0), errors=_int(d, "errors", 0), nonfinite=_int(d, "nonfinite", 0),
                   reward_sum=_num(d, "reward_sum", 0.0), reward_count=_int(d, "reward_count", 0),
                   sanitized=_int(d, "sanitized", 0), swaps=_int(d, "swaps", 0),
                   state_resets=_int(d, "state_resets", 0), release=_opt_int(d, "release"),
                   latency_p95_us=_opt_num(d, "latency_p95_us"),
                   outbox=OutboxTelemetry.from_dict(d.get("outbox", {})),
                   uploader=UploaderTelemetry.from_dict(d.get("uploader", {})),
                   late_rewards=_int(d, "late_rewards", 0), refused_records=_int(d, "refused_records", 0),
                   link=_str(d, "link", "", limit=32), boot=_str(d, "boot", "", limit=64), v=v)

    @property
    def reward_ok(self) -> bool:
        """Whether the reward counters can enter a statistic (a device may report NaN)."""
        return math.isfinite(self.reward_sum)


# -- status reports (device -> cloud) -----------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    """One step of an update, or why it stopped. On the wire, ``status`` is one string:
    ``committed``, or ``rejected:<reason>`` / ``rolled_back:<reason>``."""

    kind: UpdateStatus
    reason: str = ""
    counter: int | None = None        # the release's counter, when the manifest could be read
    detail: str = ""
    time: float = field(default_factory=time.time)
    device: str = ""
    model: str = ""
    v: int = VERSION
    # SHA-256 (hex) of the release message's manifest, when the report has no counter (the
    # manifest failed verification): a rollout attributes the rejection to the offer it answers.
    manifest: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _UPDATE_STATUSES:
            raise WireError(f"update status must be one of {_UPDATE_STATUSES}, got {self.kind!r}")

    @property
    def status(self) -> str:
        return f"{self.kind}:{self.reason}" if self.reason else self.kind

    @property
    def failed(self) -> bool:
        return self.kind in ("rejected", "rolled_back")

    @property
    def installed(self) -> bool:
        """The release runs on the device (on trial or for good)."""
        return self.kind in ("trial", "committed", "already_installed")

    @classmethod
    def parse(cls, status: str, **kw: Any) -> StatusReport:
        kind, _, reason = status.partition(":")
        if kind not in _UPDATE_STATUSES:
            raise WireError(f"unknown update status {status[:40]!r}")
        return cls(kind, reason[:_MAX_STR], **kw)  # type: ignore[arg-type]

    def with_sender(self, device: str, model: str) -> StatusReport:
        return replace(self, device=device, model=model)

    def to_dict(self) -> dict[str, Any]:
        d = {"v": self.v, "device": self.device, "model": self.model, "status": self.status,
             "counter": self.counter, "detail": self.detail[:_MAX_STR], "time": self.time}
        if self.manifest:
            d["manifest"] = self.manifest
        return d

    def encode(self) -> bytes:
        return _dumps(self.to_dict())

    @classmethod
    def decode(cls, payload: bytes) -> StatusReport:
        return cls.from_dict(_json_object(payload, "status report"))

    @classmethod
    def from_dict(cls, d: dict) -> StatusReport:
        v = _version(d, "status report")
        return cls.parse(_str(d, "status"), counter=_opt_int(d, "counter"), detail=_str(d, "detail", ""),
                         time=_num(d, "time", 0.0), device=_str(d, "device", ""), model=_str(d, "model", ""), v=v,
                         manifest=_str(d, "manifest", "", limit=64))


# -- releases (cloud -> device) -----------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseOffer:
    """A signed manifest and where its bundle is: a ``url`` (``file://`` or presigned HTTPS), or
    ``chunks`` messages that follow on the same topic. ``root_chain`` holds the signed root
    versions a device may need to walk first. Nothing here is trusted: the device installs
    only what the signed manifest names."""

    manifest: bytes
    url: str | None = None
    chunks: int | None = None
    root_chain: tuple[bytes, ...] = ()
    v: int = VERSION

    def __post_init__(self) -> None:
        if (self.url is None) == (self.chunks is None):
            raise WireError("a release offer gives its bundle as a url or as a number of chunks, not both or neither")

    def encode(self) -> bytes:
        source: dict[str, Any] = {"kind": "url", "url": self.url} if self.url is not None else \
            {"kind": "chunks", "count": self.chunks}
        return msgpack.packb({"v": self.v, "type": "release", "manifest": self.manifest, "source": source,
                              "root_chain": list(self.root_chain)})

    @classmethod
    def from_dict(cls, d: dict, v: int) -> ReleaseOffer:
        manifest = d.get("manifest")
        if not isinstance(manifest, bytes) or len(manifest) > _MAX_MANIFEST:
            raise WireError(f"release field 'manifest' must be bytes of at most {_MAX_MANIFEST}, got {_show(manifest)}")
        chain = d.get("root_chain") or []
        if not isinstance(chain, list) or len(chain) > _MAX_ROOTS or not all(isinstance(r, bytes) for r in chain):
            raise WireError("release field 'root_chain' must be a list of signed root documents")
        source = d.get("source")
        if not isinstance(source, dict):
            raise WireError(f"release field 'source' must be a map, got {_show(source)}")
        kind = source.get("kind")
        if kind == "url":
            return cls(manifest, url=_str(source, "url", limit=8192), root_chain=tuple(chain), v=v)
        if kind == "chunks":
            count = _int(source, "count", lo=1)
            if count > 4096:
                raise WireError(f"a release of {count} chunks is over the 4096-chunk limit")
            return cls(manifest, chunks=count, root_chain=tuple(chain), v=v)
        raise WireError(f"release source kind must be 'url' or 'chunks', got {str(kind)[:20]!r}")


@dataclass(frozen=True)
class Chunk:
    """Part ``index`` of the bundle whose SHA-256 is ``sha256``."""

    sha256: str
    index: int
    data: bytes
    v: int = VERSION

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.v, "type": "chunk", "sha256": self.sha256, "index": self.index,
                              "data": self.data})

    @classmethod
    def from_dict(cls, d: dict, v: int) -> Chunk:
        sha, data = _str(d, "sha256", limit=64), d.get("data")
        if not isinstance(data, bytes):
            raise WireError(f"chunk field 'data' must be bytes, got {_show(data)}")
        return cls(sha, _int(d, "index"), data, v)


def decode_release_message(payload: bytes) -> ReleaseOffer | Chunk:
    """Read what arrives on a release topic: an offer, or a chunk of a bundle offered before."""
    d = _msgpack_map(payload, "release message", max_bin_len=_MAX_CHUNK, max_str_len=1 << 20,
                     max_array_len=_MAX_ROOTS + 4, max_map_len=16, max_ext_len=0)
    v = _version(d, "release message")
    kind = d.get("type")
    if kind == "release":
        return ReleaseOffer.from_dict(d, v)
    if kind == "chunk":
        return Chunk.from_dict(d, v)
    raise WireError(f"unknown release message type {str(kind)[:20]!r}")


# -- site coordination (agent <-> coordinator, multi-agent sites) --------------------------------
#
# Coordination is deadline-bound: a message that arrives late is useless, so both go at QoS 0
# and nobody waits for a retransmission.

_MAX_SITE = 4096                  # a proposal or an answer for at most 256 members
_MAX_MEMBERS = 256


def _site_map(payload: bytes, what: str) -> dict:
    if not isinstance(payload, (bytes, bytearray)) or len(payload) > _MAX_SITE:
        raise WireError(f"{what}: expected at most {_MAX_SITE} bytes")
    d = _msgpack_map(payload, what, max_bin_len=0, max_str_len=64, max_array_len=_MAX_MEMBERS, max_map_len=16,
                     max_ext_len=0)
    _version(d, what)
    return d


def _member(d: dict, key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= 64:
        raise WireError(f"field {key!r} must be a member name, got {_show(v)}")
    return v


def _members(d: dict, key: str) -> tuple[str, ...]:
    v = d.get(key)
    if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in v):
        raise WireError(f"field {key!r} must be a list of member names, got {_show(v)}")
    return tuple(v)


@dataclass(frozen=True)
class AgentMessage:
    """What an agent proposes for a step (``.../_site/{site}/{agent}/msg``): its action, whether
    it claims the shared maintenance crew, the wear reading that ranks its claim, the crews it
    sees free, and when it was sent."""

    step: int
    agent: str
    action: int
    claim: bool
    sensor: float
    free: int          # maintenance crews free as the agent observes them
    sent_ns: int
    v: int = VERSION

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.v, "step": self.step, "agent": self.agent, "action": self.action,
                              "claim": self.claim, "sensor": float(self.sensor), "free": self.free,
                              "sent_ns": self.sent_ns})

    @classmethod
    def decode(cls, payload: bytes) -> AgentMessage:
        d = _site_map(payload, "agent message")
        claim, sensor = d.get("claim"), d.get("sensor")
        if not isinstance(claim, bool):
            raise WireError(f"field 'claim' must be a boolean, got {_show(claim)}")
        if not isinstance(sensor, float) or not math.isfinite(sensor):
            raise WireError(f"field 'sensor' must be a finite float, got {_show(sensor)}")
        return cls(_int(d, "step"), _member(d, "agent"), _int(d, "action"), claim, sensor, _int(d, "free"),
                   _int(d, "sent_ns"), _int(d, "v", 1, lo=1))


@dataclass(frozen=True)
class SiteDecision:
    """The coordinator's answer for a step (``.../_site/{site}/{coordinator}/decision``): whose
    claims it granted and denied, and whose messages were missing at its deadline."""

    step: int
    granted: tuple[str, ...]
    denied: tuple[str, ...]
    missing: tuple[str, ...]
    sent_ns: int
    v: int = VERSION

    def encode(self) -> bytes:
        return msgpack.packb({"v": self.v, "step": self.step, "granted": list(self.granted),
                              "denied": list(self.denied), "missing": list(self.missing), "sent_ns": self.sent_ns})

    @classmethod
    def decode(cls, payload: bytes) -> SiteDecision:
        d = _site_map(payload, "decision")
        return cls(_int(d, "step"), _members(d, "granted"), _members(d, "denied"), _members(d, "missing"),
                   _int(d, "sent_ns"), _int(d, "v", 1, lo=1))
