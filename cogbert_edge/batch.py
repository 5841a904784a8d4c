"""Experience batches: what travels on a device's ``exp`` topic and what the cloud stores.

A batch holds the records ``first..last`` (consecutive outbox sequence numbers) of one device,
*columnar*: one array per field, not a dict per record. It is a msgpack map of raw
little-endian arrays, optionally zlib-compressed, behind a 5-byte envelope:

    b"CBX1" | codec u8 (0 = none, 1 = zlib) | body

    body keys: v, device, fleet, first, last, n, obs_dim, act_dim, hidden,
               sessions (list of str), session_idx (u16[n]), models (list of str), model_idx (u16[n]),
               step (i64[n]), time (f64[n]), action (i32[n] or f32[n*act_dim]), log_prob, value,
               reward (f32[n]), flags (u8[n]), obs (f32[n*obs_dim]),
               state_rows (u32[k]), state_h, state_c (f32[k*hidden])

The batch id is ``"{device}:{first}-{last}"``; it is stable across device restarts (the
uploader journals ranges before sending), which is what makes storage idempotent.

:func:`decode` is the cloud's gatekeeper: the bytes come from the network, so every size is
bounded before anything is allocated and every field is checked.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np

from .records import HEAD, KNOWN_FLAGS, STATE

__all__ = ["Batch", "BatchError", "encode", "decode", "batch_id", "MAGIC", "MAX_DECOMPRESSED", "MAX_RECORDS"]

MAGIC = b"CBX1"
CODEC_NONE, CODEC_ZLIB = 0, 1
MAX_DECOMPRESSED = 16 << 20
MAX_RECORDS = 100_000
MAX_DIM = 65536
MAX_NAME = 64
_KEYS = {"v", "device", "fleet", "first", "last", "n", "obs_dim", "act_dim", "hidden", "sessions",
         "session_idx", "models", "model_idx", "step", "time", "action", "log_prob", "value", "reward",
         "flags", "obs", "state_rows", "state_h", "state_c"}


class BatchError(ValueError):
    """A batch is malformed or hostile; the message says which check failed."""


def batch_id(device: str, first: int, last: int) -> str:
    return f"{device}:{first}-{last}"


@dataclass
class Batch:
    device: str
    fleet: str
    first: int
    last: int
    sessions: list[str]
    session_idx: np.ndarray
    models: list[str]
    model_idx: np.ndarray
    step: np.ndarray
    time: np.ndarray
    action: np.ndarray          # [n] int32, or [n, act_dim] float32
    log_prob: np.ndarray
    value: np.ndarray
    reward: np.ndarray
    flags: np.ndarray
    obs: np.ndarray             # [n, obs_dim]
    state_rows: np.ndarray      # rows whose record carries the state before its decision
    state_h: np.ndarray         # [k, hidden]
    state_c: np.ndarray

    @property
    def n(self) -> int:
        return self.last - self.first + 1

    @property
    def id(self) -> str:
        return batch_id(self.device, self.first, self.last)

    @property
    def seqs(self) -> np.ndarray:
        return np.arange(self.first, self.last + 1, dtype=np.int64)


def encode(device: str, fleet: str, records: list[tuple[int, bytes]], *, compress: bool = True,
           min_saving: float = 0.1) -> bytes:
    """Columnar batch of consecutive ``(seq, record payload)`` pairs of one model shape.

    Works on the encoded records directly (one ``struct`` unpack and a few slices each), so
    building a batch costs a couple of microseconds a record.
    """
    if not records:
        raise ValueError("empty batch")
    first, last = records[0][0], records[-1][0]
    if last - first + 1 != len(records):
        raise ValueError("batch records must have consecutive sequence numbers")
    heads = [HEAD.unpack_from(p) for _, p in records]
    _, _, obs_dim, act_dim, _, _, _, *_ = heads[0]
    sessions: dict[str, int] = {}
    models: dict[str, int] = {}
    s_idx, m_idx, obs, acts, state_rows, hs, cs = [], [], [], [], [], [], []
    hidden = 0
    for row, ((_, p), h) in enumerate(zip(records, heads)):
        _, flags, od, ad, hid, slen, mlen = h[:7]
        if od != obs_dim or ad != act_dim:
            raise ValueError("all records of a batch must share obs_dim and act_dim")
        o = HEAD.size
        s_idx.append(sessions.setdefault(p[o:o + slen].decode(errors="replace"), len(sessions)))
        o += slen
        m_idx.append(models.setdefault(p[o:o + mlen].decode(errors="replace"), len(models)))
        o += mlen
        obs.append(p[o:o + 4 * od])
        o += 4 * od
        if ad:
            acts.append(p[o:o + 4 * ad])
            o += 4 * ad
        if flags & STATE:
            if hidden and hid != hidden:
                raise ValueError("all state snapshots of a batch must share the hidden size")
            hidden = hid
            state_rows.append(row)
            hs.append(p[o:o + 4 * hid])
            cs.append(p[o + 4 * hid:o + 8 * hid])
    cols = list(zip(*heads))
    body = {
        "v": 1, "device": device, "fleet": fleet, "first": first, "last": last, "n": len(records),
        "obs_dim": obs_dim, "act_dim": act_dim, "hidden": hidden,
        "sessions": list(sessions), "session_idx": np.asarray(s_idx, "<u2").tobytes(),
        "models": list(models), "model_idx": np.asarray(m_idx, "<u2").tobytes(),
        "step": np.asarray(cols[7], "<i8").tobytes(), "time": np.asarray(cols[8], "<f8").tobytes(),
        "action": b"".join(acts) if act_dim else np.asarray(cols[9], "<i4").tobytes(),
        "log_prob": np.asarray(cols[10], "<f4").tobytes(), "value": np.asarray(cols[11], "<f4").tobytes(),
        "reward": np.asarray(cols[12], "<f4").tobytes(),
        "flags": np.asarray([f & ~STATE for f in cols[1]], "<u1").tobytes(),
        "obs": b"".join(obs), "state_rows": np.asarray(state_rows, "<u4").tobytes(),
        "state_h": b"".join(hs), "state_c": b"".join(cs),
    }
    raw = msgpack.packb(body, use_bin_type=True)
    if compress:
        packed = zlib.compress(raw, 1)
        if len(packed) < (1.0 - min_saving) * len(raw):   # float data barely compresses: then do not bother
            return MAGIC + bytes([CODEC_ZLIB]) + packed
    return MAGIC + bytes([CODEC_NONE]) + raw


def decode(data: bytes, *, max_decompressed: int = MAX_DECOMPRESSED) -> Batch:
    """Parse and validate untrusted batch bytes; raises :class:`BatchError`."""
    if len(data) < 5 or data[:4] != MAGIC:
        raise BatchError("not a Cogbert experience batch (bad magic)")
    codec, body = data[4], data[5:]
    if codec == CODEC_ZLIB:
        d = zlib.decompressobj()
        try:
            raw = d.decompress(body, max_decompressed)
        except zlib.error as e:
            raise BatchError(f"corrupt zlib stream: {e}") from None
        if d.unconsumed_tail or not d.eof:
            raise BatchError(f"decompresses past {max_decompressed} bytes or is truncated")
    elif codec == CODEC_NONE:
        raw = body
        if len(raw) > max_decompressed:
            raise BatchError("batch too large")
    else:
        raise BatchError(f"unknown codec {codec}")
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=max_decompressed,
                            max_str_len=4096, max_array_len=MAX_RECORDS, max_map_len=64, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 - msgpack raises many types for hostile input
        raise BatchError(f"body is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(m, dict) or set(m) != _KEYS:
        raise BatchError("body has the wrong set of fields")
    if m["v"] != 1:
        raise BatchError(f"unsupported batch version {m['v']!r}")
    for k in ("device", "fleet"):
        if not isinstance(m[k], str) or not 0 < len(m[k]) <= MAX_NAME:
            raise BatchError(f"{k} must be a short string")
    first, last, n = (_int(m, k, 1, 2**62) for k in ("first", "last", "n"))
    if n > MAX_RECORDS or last - first + 1 != n:
        raise BatchError(f"n={n} does not match first..last {first}..{last} (max {MAX_RECORDS} records)")
    obs_dim = _int(m, "obs_dim", 1, MAX_DIM)
    act_dim = _int(m, "act_dim", 0, MAX_DIM)
    hidden = _int(m, "hidden", 0, MAX_DIM)
    sessions, models = m["sessions"], m["models"]
    for name, table in (("sessions", sessions), ("models", models)):
        if (not isinstance(table, list) or not 0 < len(table) <= n
                or not all(isinstance(s, str) and len(s) <= MAX_NAME for s in table)):
            raise BatchError(f"{name} must be a list of 1..n short strings")
    session_idx = _array(m, "session_idx", "<u2", n)
    model_idx = _array(m, "model_idx", "<u2", n)
    if session_idx.max() >= len(sessions) or model_idx.max() >= len(models):
        raise BatchError("an index points outside its table")
    state_rows = _array(m, "state_rows", "<u4", None)
    k = state_rows.size
    if k and (state_rows.max() >= n or np.any(np.diff(state_rows.astype(np.int64)) <= 0) or hidden == 0):
        raise BatchError("state_rows must be increasing row numbers, with hidden > 0")
    flags = _array(m, "flags", "<u1", n)
    if np.any(flags & ~np.uint8(KNOWN_FLAGS & ~STATE)):
        raise BatchError("unknown flag bits")
    batch = Batch(
        device=m["device"], fleet=m["fleet"], first=first, last=last, sessions=sessions,
        session_idx=session_idx, models=models, model_idx=model_idx,
        step=_array(m, "step", "<i8", n), time=_array(m, "time", "<f8", n),
        action=(_array(m, "action", "<f4", n * act_dim).reshape(n, act_dim) if act_dim
                else _array(m, "action", "<i4", n)),
        log_prob=_array(m, "log_prob", "<f4", n), value=_array(m, "value", "<f4", n),
        reward=_array(m, "reward", "<f4", n), flags=flags,
        obs=_array(m, "obs", "<f4", n * obs_dim).reshape(n, obs_dim), state_rows=state_rows,
        state_h=_array(m, "state_h", "<f4", k * hidden).reshape(k, hidden),
        state_c=_array(m, "state_c", "<f4", k * hidden).reshape(k, hidden))
    for name in ("time", "log_prob", "value", "reward", "obs", "state_h", "state_c"):
        if not np.isfinite(getattr(batch, name)).all():
            raise BatchError(f"{name} holds NaN or Inf")
    if act_dim and not np.isfinite(batch.action).all():
        raise BatchError("action holds NaN or Inf")
    return batch


def _int(m: dict, key: str, lo: int, hi: int) -> int:
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BatchError(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def _array(m: dict, key: str, dtype: str, count: int | None) -> np.ndarray:
    v = m[key]
    if not isinstance(v, bytes):
        raise BatchError(f"{key} must be raw bytes")
    size = np.dtype(dtype).itemsize
    if count is None:
        if len(v) % size:
            raise BatchError(f"{key} is not a whole number of {dtype} values")
        count = len(v) // size
    if len(v) != count * size:
        raise BatchError(f"{key} has {len(v)} bytes; expected {count * size}")
    return np.frombuffer(v, dtype, count) if count else np.zeros(0, dtype)


def estimate_records(avg_record_bytes: float, max_bytes: int) -> int:
    """How many records of this size fit a batch of ``max_bytes`` (a first guess)."""
    return max(1, math.floor(max_bytes * 0.97 / max(avg_record_bytes - 24.0, 1.0)))
