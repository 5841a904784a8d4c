"""One experience record: a decision, what came of it, and where it came from.

A record is what the device stores in its outbox for each decision: the session and step it
belongs to, the observation, the action, the behaviour log-probability and value the policy
reported, the reward and done/truncated flags that followed, the model version that decided,
and a timestamp. The first record of every uploaded sequence also carries the recurrent state
``(h, c)`` the policy had *before* that decision, so the trainer can rebuild the behaviour
policy's state from there.

The binary layout is fixed and little-endian, so that encoding costs one ``struct.pack`` and
a few ``bytes`` joins on the decision path:

    head  (44 bytes)  kind u8, flags u8, obs_dim u16, act_dim u16, hidden u16, session_len u16,
                      model_len u16, step i64, time f64, action i32, log_prob f32, value f32,
                      reward f32
    session   session_len bytes (UTF-8)
    model     model_len bytes (UTF-8)
    obs       obs_dim float32
    action    act_dim float32 (continuous actions only; act_dim 0 means discrete, in ``action``)
    state     hidden float32 h, then hidden float32 c (only when flags has STATE)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from cogbert_edge.errors import RecordError

__all__ = ["Record", "encode", "decode", "DONE", "TRUNCATED", "STATE", "DETERMINISTIC", "RecordError"]

HEAD = struct.Struct("<BBHHHHHqdifff")
KIND_TRANSITION = 1
DONE, TRUNCATED, STATE, DETERMINISTIC = 1, 2, 4, 8
KNOWN_FLAGS = DONE | TRUNCATED | STATE | DETERMINISTIC
MAX_NAME = 64


@dataclass
class Record:
    session: str
    step: int
    obs: np.ndarray                  # float32 [obs_dim]
    action: int | np.ndarray         # int, or float32 [act_dim]
    log_prob: float
    value: float
    model: str
    time: float
    reward: float = 0.0
    flags: int = 0
    h: np.ndarray | None = None      # state before this decision (first record of a sequence)
    c: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return bool(self.flags & DONE)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TRUNCATED)


def encode(r: Record) -> bytes:
    """Bytes of ``r``. Names longer than 64 bytes are cut (they are ids, not text)."""
    s = r.session.encode()[:MAX_NAME]
    m = r.model.encode()[:MAX_NAME]
    flags = r.flags & ~STATE
    parts = [b"", s, m, np.asarray(r.obs, np.float32).tobytes()]
    if isinstance(r.action, (int, np.integer)):
        act_dim, action_i = 0, int(r.action)
    else:
        a = np.asarray(r.action, np.float32)
        act_dim, action_i = a.size, 0
        parts.append(a.tobytes())
    hidden = 0
    if r.h is not None:
        flags |= STATE
        hidden = r.h.size
        parts.append(np.asarray(r.h, np.float32).tobytes())
        parts.append(np.asarray(r.c, np.float32).tobytes())
    parts[0] = HEAD.pack(KIND_TRANSITION, flags, r.obs.size, act_dim, hidden, len(s), len(m), r.step,
                         r.time, action_i, r.log_prob, r.value, r.reward)
    return b"".join(parts)


def decode(data: bytes | memoryview) -> Record:
    """Inverse of :func:`encode`; raises :class:`RecordError` on anything inconsistent."""
    if len(data) < HEAD.size:
        raise RecordError("record shorter than its head")
    (kind, flags, obs_dim, act_dim, hidden, slen, mlen, step, t, action_i, logp, value,
     reward) = HEAD.unpack_from(data)
    need = HEAD.size + slen + mlen + 4 * (obs_dim + act_dim + (2 * hidden if flags & STATE else 0))
    if kind != KIND_TRANSITION or flags & ~KNOWN_FLAGS or len(data) != need:
        raise RecordError(f"bad record (kind {kind}, flags {flags:#x}, {len(data)} bytes, expected {need})")
    o = HEAD.size
    mv = memoryview(data)
    session = bytes(mv[o:o + slen]).decode(errors="replace")
    o += slen
    model = bytes(mv[o:o + mlen]).decode(errors="replace")
    o += mlen
    obs = np.frombuffer(mv, np.float32, obs_dim, o)
    o += 4 * obs_dim
    action: int | np.ndarray = action_i
    if act_dim:
        action = np.frombuffer(mv, np.float32, act_dim, o)
        o += 4 * act_dim
    h = c = None
    if flags & STATE:
        h = np.frombuffer(mv, np.float32, hidden, o)
        c = np.frombuffer(mv, np.float32, hidden, o + 4 * hidden)
    return Record(session, step, obs, action, logp, value, model, t, reward, flags, h, c)
