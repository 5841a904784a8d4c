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

import itertools
import math
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np

from cogbert_edge.errors import BatchError
from cogbert_edge.wire.records import HEAD, KNOWN_FLAGS, STATE

__all__ = ["Batch", "BatchError", "encode", "encode_batch", "encode_run", "decode", "batch_id", "MAGIC",
           "MAX_DECOMPRESSED", "MAX_RECORDS"]

MAGIC = b"CBX1"
CODEC_NONE, CODEC_ZLIB = 0, 1
MAX_DECOMPRESSED = 16 << 20
MAX_RECORDS = 100_000
MAX_DIM = 65536
MAX_NAME = 64
_KEYS = {"v", "device", "fleet", "first", "last", "n", "obs_dim", "act_dim", "hidden", "sessions",
         "session_idx", "models", "model_idx", "step", "time", "action", "log_prob", "value", "reward",
         "flags", "obs", "state_rows", "state_h", "state_c"}


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

    def sliced(self, first: int, last: int) -> Batch:
        """The records ``first..last`` (sequence numbers within this batch) as a batch of their
        own: what ingestion stores of a batch that overlaps records it already has."""
        if not self.first <= first <= last <= self.last:
            raise BatchError(f"{first}..{last} is not within {self.first}..{self.last}")
        i, j = first - self.first, last - self.first + 1
        keep = (self.state_rows >= i) & (self.state_rows < j)
        sessions, session_idx = _retable(self.sessions, self.session_idx[i:j])
        models, model_idx = _retable(self.models, self.model_idx[i:j])
        return Batch(self.device, self.fleet, first, last, sessions, session_idx, models, model_idx,
                     self.step[i:j], self.time[i:j], self.action[i:j], self.log_prob[i:j], self.value[i:j],
                     self.reward[i:j], self.flags[i:j], self.obs[i:j],
                     (self.state_rows[keep] - i).astype("<u4"), self.state_h[keep], self.state_c[keep])


def _retable(names: list[str], idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    """A name table holding only the names ``idx`` uses, and ``idx`` into it."""
    used, inverse = np.unique(idx, return_inverse=True)
    return [names[int(u)] for u in used], inverse.astype("<u2")


def encode_batch(b: Batch, *, compress: bool = True, min_saving: float = 0.1) -> bytes:
    """The wire form of a decoded (or sliced) batch: ``decode(encode_batch(b))`` equals ``b``."""
    act_dim = b.action.shape[1] if b.action.ndim == 2 else 0
    body = {
        "v": 1, "device": b.device, "fleet": b.fleet, "first": b.first, "last": b.last, "n": b.n,
        "obs_dim": int(b.obs.shape[1]), "act_dim": act_dim, "hidden": int(b.state_h.shape[1]),
        "sessions": list(b.sessions), "session_idx": b.session_idx.astype("<u2").tobytes(),
        "models": list(b.models), "model_idx": b.model_idx.astype("<u2").tobytes(),
        "step": b.step.astype("<i8").tobytes(), "time": b.time.astype("<f8").tobytes(),
        "action": b.action.astype("<f4" if act_dim else "<i4").tobytes(),
        "log_prob": b.log_prob.astype("<f4").tobytes(), "value": b.value.astype("<f4").tobytes(),
        "reward": b.reward.astype("<f4").tobytes(), "flags": b.flags.astype("<u1").tobytes(),
        "obs": b.obs.astype("<f4").tobytes(), "state_rows": b.state_rows.astype("<u4").tobytes(),
        "state_h": b.state_h.astype("<f4").tobytes(), "state_c": b.state_c.astype("<f4").tobytes(),
    }
    raw = msgpack.packb(body, use_bin_type=True)
    if compress:
        packed = zlib.compress(raw, 1)
        if len(packed) < (1.0 - min_saving) * len(raw):
            return MAGIC + bytes([CODEC_ZLIB]) + packed
    return MAGIC + bytes([CODEC_NONE]) + raw


# The record head (records.HEAD) as a numpy record type, to read many heads at once.
_HEAD = np.dtype([("kind", "u1"), ("flags", "u1"), ("obs_dim", "<u2"), ("act_dim", "<u2"), ("hidden", "<u2"),
                  ("slen", "<u2"), ("mlen", "<u2"), ("step", "<i8"), ("time", "<f8"), ("action", "<i4"),
                  ("log_prob", "<f4"), ("value", "<f4"), ("reward", "<f4")])
assert _HEAD.itemsize == HEAD.size
assert _HEAD.fields is not None            # a structured dtype always has fields
_NAME_LENS = _HEAD.fields["slen"][1]      # slen, mlen: adjacent u2 fields


def encode(device: str, fleet: str, records: list[tuple[int, bytes]], *, compress: bool = True,
           min_saving: float = 0.1) -> bytes:
    """Columnar batch of consecutive ``(seq, record payload)`` pairs of one model shape."""
    if not records:
        raise BatchError("empty batch")
    if records[-1][0] - records[0][0] + 1 != len(records):
        raise BatchError("batch records must have consecutive sequence numbers")
    return encode_run(device, fleet, records[0][0], [p for _, p in records], compress=compress,
                      min_saving=min_saving)


def encode_run(device: str, fleet: str, first: int, payloads: list[bytes], *, compress: bool = True,
               min_saving: float = 0.1) -> bytes:
    """Columnar batch of the record payloads ``first, first+1, ...`` of one model shape.

    Works on the encoded records as numpy arrays rather than one by one (a Python loop cost
    ~1.2 µs a record, as much as the rest of the upload path): the records of one layout (the
    same length and name lengths; usually two layouts, with and without a state snapshot)
    form one 2-D byte array, whose column slices are the fields.
    """
    if not payloads:
        raise BatchError("empty batch")
    n = len(payloads)
    last = first + n - 1
    blocks = _layouts(payloads)
    head_bytes = np.empty((n, HEAD.size), np.uint8)
    for rows, table, _, _ in blocks:
        head_bytes[rows] = table[:, :HEAD.size]
    heads = head_bytes.view(_HEAD)[:, 0]
    obs_dim, act_dim = int(heads["obs_dim"][0]), int(heads["act_dim"][0])
    if np.any(heads["obs_dim"] != obs_dim) or np.any(heads["act_dim"] != act_dim):
        raise BatchError("all records of a batch must share obs_dim and act_dim")
    has_state = (heads["flags"] & STATE) != 0
    state_rows = np.flatnonzero(has_state)
    hidden = int(heads["hidden"][state_rows[0]]) if state_rows.size else 0
    if np.any(heads["hidden"][state_rows] != hidden):
        raise BatchError("all state snapshots of a batch must share the hidden size")

    obs = np.empty((n, 4 * obs_dim), np.uint8)
    acts = np.empty((n, 4 * act_dim), np.uint8)
    state_h = np.empty((state_rows.size, 4 * hidden), np.uint8)
    state_c = np.empty_like(state_h)
    state_pos = np.cumsum(has_state) - 1            # row -> its row in state_h / state_c
    names = _NameTables(n)
    for rows, table, slen, mlen in blocks:
        o = HEAD.size + slen + mlen
        state = bool(has_state[rows[0]])
        if (table.shape[1] != o + 4 * (obs_dim + act_dim) + (8 * hidden if state else 0)
                or np.any(has_state[rows] != state)):
            raise BatchError("a record's length does not match its head")
        names.add(rows, table[:, HEAD.size:HEAD.size + slen], table[:, HEAD.size + slen:o])
        obs[rows] = table[:, o:o + 4 * obs_dim]
        o += 4 * obs_dim
        acts[rows] = table[:, o:o + 4 * act_dim]
        o += 4 * act_dim
        if state:
            state_h[state_pos[rows]] = table[:, o:o + 4 * hidden]
            state_c[state_pos[rows]] = table[:, o + 4 * hidden:o + 8 * hidden]
    sessions, session_idx, models, model_idx = names.tables()
    body = {
        "v": 1, "device": device, "fleet": fleet, "first": first, "last": last, "n": n,
        "obs_dim": obs_dim, "act_dim": act_dim, "hidden": hidden,
        "sessions": sessions, "session_idx": session_idx.tobytes(),
        "models": models, "model_idx": model_idx.tobytes(),
        "step": heads["step"].tobytes(), "time": heads["time"].tobytes(),
        "action": acts.data if act_dim else heads["action"].tobytes(),
        "log_prob": heads["log_prob"].tobytes(), "value": heads["value"].tobytes(),
        "reward": heads["reward"].tobytes(), "flags": (heads["flags"] & ~np.uint8(STATE)).tobytes(),
        # The large columns go to msgpack as views (ndarray.data, a memoryview of the array's
        # buffer): it copies them once, into the message.
        "obs": obs.data, "state_rows": state_rows.astype("<u4").tobytes(),
        "state_h": state_h.data, "state_c": state_c.data,
    }
    raw = msgpack.packb(body, use_bin_type=True)
    if compress:
        packed = zlib.compress(raw, 1)
        if len(packed) < (1.0 - min_saving) * len(raw):   # float data barely compresses: then do not bother
            return MAGIC + bytes([CODEC_ZLIB]) + packed
    return MAGIC + bytes([CODEC_NONE]) + raw


def _layouts(payloads: list[bytes]) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """Group records by layout: ``(rows, bytes [len(rows), length], session_len, model_len)``."""
    n = len(payloads)
    lens = np.fromiter(map(len, payloads), np.int64, n)
    if lens.min() < HEAD.size:
        raise BatchError("a record is shorter than its head")
    out = []
    for length in sorted(set(lens.tolist())):
        mask = lens == length
        rows = np.flatnonzero(mask)
        joined = b"".join(payloads) if rows.size == n else b"".join(itertools.compress(payloads, mask.tolist()))
        table = np.frombuffer(joined, np.uint8).reshape(rows.size, length)
        # Name lengths from the head (slen, mlen): one length can split differently.
        split = table[:, _NAME_LENS:_NAME_LENS + 4].copy().view("<u4")[:, 0]
        keys = sorted(set(split.tolist()))
        for key in keys:
            pick = slice(None) if len(keys) == 1 else np.flatnonzero(split == key)
            out.append((rows[pick], table[pick], key & 0xFFFF, key >> 16))
    return out


class _NameTables:
    """Session and model names to string tables in order of first appearance, and each
    row's index into them, from name columns given a block of rows at a time."""

    def __init__(self, n: int) -> None:
        # (first row, kind, name, rows of the block, mask of those rows with this name or None: all)
        self._seen: list[tuple[int, int, bytes, np.ndarray, np.ndarray | None]] = []
        self._idx = (np.empty(n, "<u2"), np.empty(n, "<u2"))

    def add(self, rows: np.ndarray, sessions: np.ndarray, models: np.ndarray) -> None:
        for kind, col in enumerate((sessions, models)):
            if col.shape[1] == 0 or not np.any(col != col[0]):       # the usual case: one name
                self._seen.append((int(rows[0]), kind, col[0].tobytes(), rows, None))
                continue
            uniq, where, inverse = np.unique(col, axis=0, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
            for k in range(len(uniq)):
                self._seen.append((int(rows[where[k]]), kind, uniq[k].tobytes(), rows, inverse == k))

    def tables(self) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
        tables: tuple[dict[str, int], dict[str, int]] = ({}, {})
        for _first, kind, raw, rows, mask in sorted(self._seen, key=lambda e: (e[0], e[1])):
            table = tables[kind]
            # Keyed by the decoded name, as a dict of names would be.
            self._idx[kind][rows if mask is None else rows[mask]] = table.setdefault(
                raw.decode(errors="replace"), len(table))
        return list(tables[0]), self._idx[0], list(tables[1]), self._idx[1]


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
        raise BatchError(f"unsupported batch version: {str(m['v'])[:40]!r}")
    for key in ("device", "fleet"):
        if not isinstance(m[key], str) or not 0 < len(m[key]) <= MAX_NAME:
            raise BatchError(f"{key} must be a short string")
    first, last, n = (_int(m, key, 1, 2**62) for key in ("first", "last", "n"))
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
