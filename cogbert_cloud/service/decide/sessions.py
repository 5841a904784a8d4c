"""The server-side session cache: recurrent state for clients that do not echo state tokens.

Bounded three ways: an idle timeout, a memory cap (the state arrays plus a fixed allowance per
entry), and nothing else grows with the number of sessions. The least recently used entry goes
first; every eviction is counted (``evicted_idle``, ``evicted_memory``). A session that was
evicted is unknown to this replica afterwards: a client that sends its last state token
resumes it anyway, one without gets 404 ``unknown_session`` and starts a new one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SessionCache", "Session"]

_ENTRY_OVERHEAD = 600   # bytes: the entry object, its key, dict slots (measured with tracemalloc: ~520)


@dataclass(eq=False)
class Session:
    client: str
    name: str
    lane: Any                 # the Lane that logs its decisions
    policy: Any               # the Policy it started on: a session keeps its model until it ends
    model: str
    h: np.ndarray
    c: np.ndarray
    step: int = 0
    key: int = 0              # the session's sampling key (engine.session_seed)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False        # a decision of this session is queued or running
    waiting: list = field(default_factory=list)   # decisions that arrived while busy, in order


class SessionCache:
    def __init__(self, *, max_bytes: int = 256 << 20, idle_seconds: float = 600.0) -> None:
        self.max_bytes = max_bytes
        self.idle_seconds = idle_seconds
        self._d: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.bytes = 0
        self.evicted_idle = self.evicted_memory = 0

    def __len__(self) -> int:
        return len(self._d)

    @staticmethod
    def _size(s: Session) -> int:
        return s.h.nbytes + s.c.nbytes + _ENTRY_OVERHEAD

    def get(self, client: str, name: str) -> Session | None:
        s = self._d.get((client, name))
        if s is None:
            return None
        now = time.monotonic()
        if now - s.last_used > self.idle_seconds and not s.busy:
            self.pop(client, name)
            self.evicted_idle += 1
            return None
        s.last_used = now
        self._d.move_to_end((client, name))
        return s

    def put(self, s: Session) -> None:
        key = (s.client, s.name)
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= self._size(old)
        self._d[key] = s
        self.bytes += self._size(s)
        self._shrink()

    def pop(self, client: str, name: str) -> Session | None:
        s = self._d.pop((client, name), None)
        if s is not None:
            self.bytes -= self._size(s)
        return s

    def sweep(self) -> int:
        """Drop idle sessions (oldest first); returns how many."""
        now, n = time.monotonic(), 0
        while self._d:
            key, s = next(iter(self._d.items()))
            if now - s.last_used <= self.idle_seconds:
                break
            if s.busy:            # in flight: it is used right now, keep it
                self._d.move_to_end(key)
                continue
            self.pop(*key)
            self.evicted_idle += 1
            n += 1
        return n

    def items(self) -> list[Session]:
        return list(self._d.values())

    def _shrink(self) -> None:
        while self.bytes > self.max_bytes and len(self._d) > 1:
            key, s = next(iter(self._d.items()))
            if s.busy:
                self._d.move_to_end(key)
                if next(iter(self._d.values())).busy:
                    break         # everything in flight: the cap is exceeded briefly rather than lose state
                continue
            self.pop(*key)
            self.evicted_memory += 1
