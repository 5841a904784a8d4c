"""Reading stored experience back: per-device records in sequence order, for the trainer.

Batch objects live at ``experience/{fleet}/{device}/{first:016d}-{last:016d}.cbx`` (stores
written before Cogbert 0.2 also have ``experience/{fleet}/{day}/{device}/...``, read alike).
Sequence numbers are the device's outbox numbers (1, 2, 3, ...), so a missing range is a gap
(records the device dropped under its outbox bounds, or that were never uploaded) and a range
stored twice is a duplicate; :meth:`ExperienceDataset.stats` counts both. Readers take each
record once, whatever the store holds: a record in several stored batches is read from the
batch that starts first.

:meth:`ExperienceDataset.sequences` yields what the trainer consumes: runs of consecutive
records of one session, each starting at a record that carries the behaviour policy's
recurrent state, cut at episode ends, gaps, restarts (a step that does not follow the previous
one), and at the first state snapshot after ``max_len`` records.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cogbert_cloud.data import keys
from cogbert_cloud.data.store import ObjectStore
from cogbert_edge.wire import batch as batch_codec
from cogbert_edge.wire.records import DONE, TRUNCATED

__all__ = ["ExperienceDataset", "Sequence"]

# experience/FLEET/DEVICE/FIRST-LAST.cbx, or the older experience/FLEET/DAY/DEVICE/FIRST-LAST.cbx.


@dataclass
class Sequence:
    """Consecutive decisions of one session, from a recorded recurrent state."""

    device: str
    session: str
    seqs: np.ndarray       # [T] outbox sequence numbers
    obs: np.ndarray        # [T, obs_dim]
    action: np.ndarray     # [T] or [T, act_dim]
    log_prob: np.ndarray   # [T] behaviour log-probabilities
    value: np.ndarray      # [T] behaviour value estimates
    reward: np.ndarray     # [T]
    done: np.ndarray       # [T] bool: the episode ended after this decision
    truncated: np.ndarray  # [T] bool
    models: list[str]      # [T] model version that decided
    h0: np.ndarray         # [hidden] state before the first decision
    c0: np.ndarray


class ExperienceDataset:
    def __init__(self, store: ObjectStore, fleet: str | None = None) -> None:
        self.store = store
        self.fleet = fleet

    def index(self) -> dict[tuple[str, str], list[tuple[int, int, str]]]:
        """(fleet, device) -> [(first, last, key)] sorted by first."""
        out: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
        for key in self.store.list(keys.experience_prefix(self.fleet or None)):
            where = keys.parse_experience_key(key)
            if where:
                out.setdefault(where[:2], []).append((where[2], where[3], key))
        for v in out.values():
            v.sort()
        return out

    def stats(self) -> dict:
        idx = self.index()
        transitions = duplicates = gaps = missing = 0
        for ranges in idx.values():
            covered = 0          # highest seq seen so far
            for first, last, _ in ranges:
                if first > covered + 1:
                    gaps += 1
                    missing += first - covered - 1
                overlap = max(0, min(last, covered) - first + 1)
                duplicates += overlap
                transitions += (last - first + 1) - overlap
                covered = max(covered, last)
        return {"transitions": transitions, "devices": len(idx), "batches": sum(len(v) for v in idx.values()),
                "duplicates": duplicates, "gaps": gaps, "missing": missing}

    def batches(self, fleet: str, device: str) -> Iterator[batch_codec.Batch]:
        for _, _, key in self.index().get((fleet, device), []):
            yield batch_codec.decode(self.store.get(key))

    def sequences(self, max_len: int = 64) -> Iterator[Sequence]:
        """Every device's sessions as trainable sequences (see the module docstring)."""
        for (fleet, device) in sorted(self.index()):
            yield from self._device_sequences(fleet, device, max_len)

    def _device_sequences(self, fleet: str, device: str, max_len: int) -> Iterator[Sequence]:
        open_: dict[str, dict] = {}    # session -> rows being collected
        last_seq = 0
        for b in self.batches(fleet, device):
            start = max(0, last_seq + 1 - b.first)   # rows up to last_seq were read already
            if start >= b.n:
                continue
            if b.first + start != last_seq + 1:  # a gap: no sequence may span it
                open_.clear()
            last_seq = b.last
            state_at = {int(r): i for i, r in enumerate(b.state_rows)}
            for row in range(start, b.n):
                session = b.sessions[b.session_idx[row]]
                cur = open_.get(session)
                snap = state_at.get(row)
                step = int(b.step[row])
                broken = cur is not None and step != cur["step"] + 1   # a restart: a new episode
                if cur is None or broken or snap is not None and len(cur["rows"]) >= max_len:
                    if cur is not None:
                        yield _make(device, session, cur)
                    if snap is None:
                        open_.pop(session, None)   # no state to start from: wait for a snapshot
                        continue
                    cur = open_[session] = {"rows": [], "h0": b.state_h[snap], "c0": b.state_c[snap]}
                cur["rows"].append((b, row))
                cur["step"] = step
                if b.flags[row] & (DONE | TRUNCATED):
                    yield _make(device, session, open_.pop(session))
        for session, cur in open_.items():
            yield _make(device, session, cur)


def _make(device: str, session: str, cur: dict) -> Sequence:
    rows = cur["rows"]

    def col(name: str) -> np.ndarray:
        return np.stack([getattr(b, name)[r] for b, r in rows])

    flags = col("flags")
    return Sequence(device=device, session=session, seqs=np.array([b.first + r for b, r in rows]),
                    obs=col("obs"), action=col("action"), log_prob=col("log_prob"), value=col("value"),
                    reward=col("reward"), done=(flags & DONE) > 0, truncated=(flags & TRUNCATED) > 0,
                    models=[b.models[b.model_idx[r]] for b, r in rows], h0=cur["h0"], c0=cur["c0"])
