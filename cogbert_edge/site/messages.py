"""The two messages of a site's coordination network, msgpack-encoded and strictly decoded.

* :class:`AgentMessage` (``.../_site/{site}/{agent}/msg``, QoS 0): what an agent proposes for a
  step: its action, whether it claims the shared maintenance crew, the wear sensor reading that
  ranks its claim, and when it was sent.
* :class:`Decision` (``.../_site/{site}/{coordinator}/decision``, QoS 0): the coordinator's answer
  for a step: which claims it granted and denied, whose messages were missing at its deadline.

Coordination is deadline-bound: a message that arrives late is useless, so both go at QoS 0 and
nobody waits for a retransmission. Bad bytes raise :class:`~cogbert_edge.errors.WireError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from cogbert_edge.errors import WireError

__all__ = ["AgentMessage", "Decision"]

_MAX = 4096


def _unpack(data: bytes, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray)) or len(data) > _MAX:
        raise WireError(f"{what}: expected at most {_MAX} bytes")
    try:
        d = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise WireError(f"{what}: not msgpack: {e}") from None
    if not isinstance(d, dict) or set(d) != keys:
        raise WireError(f"{what}: expected the fields {sorted(keys)}")
    return d


def _int(what: str, v: Any, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise WireError(f"{what} must be an integer >= {lo}, got {v!r}")
    return v


def _names(what: str, v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > 256 or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in v):
        raise WireError(f"{what} must be a list of member names")
    return tuple(v)


@dataclass(frozen=True)
class AgentMessage:
    step: int
    agent: str
    action: int
    claim: bool
    sensor: float
    free: int          # maintenance crews free as the agent observes them
    sent_ns: int

    _KEYS = frozenset({"step", "agent", "action", "claim", "sensor", "free", "sent_ns"})

    def encode(self) -> bytes:
        return msgpack.packb({"step": self.step, "agent": self.agent, "action": self.action, "claim": self.claim,
                              "sensor": float(self.sensor), "free": self.free, "sent_ns": self.sent_ns})

    @classmethod
    def decode(cls, data: bytes) -> AgentMessage:
        d = _unpack(data, "agent message", set(cls._KEYS))
        if not isinstance(d["agent"], str) or not 0 < len(d["agent"]) <= 64:
            raise WireError("agent message: agent must be a member name")
        if not isinstance(d["claim"], bool):
            raise WireError("agent message: claim must be a boolean")
        if not isinstance(d["sensor"], float) or not math.isfinite(d["sensor"]):
            raise WireError("agent message: sensor must be a finite float")
        return cls(_int("step", d["step"]), d["agent"], _int("action", d["action"]), d["claim"], d["sensor"],
                   _int("free", d["free"]), _int("sent_ns", d["sent_ns"]))


@dataclass(frozen=True)
class Decision:
    step: int
    granted: tuple[str, ...]
    denied: tuple[str, ...]
    missing: tuple[str, ...]
    sent_ns: int

    _KEYS = frozenset({"step", "granted", "denied", "missing", "sent_ns"})

    def encode(self) -> bytes:
        return msgpack.packb({"step": self.step, "granted": list(self.granted), "denied": list(self.denied),
                              "missing": list(self.missing), "sent_ns": self.sent_ns})

    @classmethod
    def decode(cls, data: bytes) -> Decision:
        d = _unpack(data, "decision", set(cls._KEYS))
        return cls(_int("step", d["step"]), _names("granted", d["granted"]), _names("denied", d["denied"]),
                   _names("missing", d["missing"]), _int("sent_ns", d["sent_ns"]))
