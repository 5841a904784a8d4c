"""Logging what a device experienced, for the cloud to learn from.

    log = ExperienceLog(outbox, model=policy.model_id)
    d = policy.act(obs, state)
    log.decision("unit-7", obs, d, state)      # the state *before* the decision
    ...
    log.reward("unit-7", 1.5)                  # whenever the outcome is known
    log.reward("unit-7", -3.0, done=True)      # the episode ended

How rewards are joined to decisions: a reward belongs to the latest decision of its session,
and adds to any reward that decision already has. A decision's record is written to the
outbox when it can no longer receive rewards: when the session's next decision is made, when
a reward reports ``done`` or ``truncated``, or on :meth:`end_session` / :meth:`flush`. With
``reward_delay`` = K > 0 the last K+1 decisions of a session stay open, and
``reward(session, value, step=s)`` may name an older one that is still open; a reward for a
decision already written is counted in ``late_rewards`` and dropped (the decision's record is
already on its way to the cloud).

Every ``snapshot_every`` steps of a session (and at its first step) the record carries the
recurrent state the policy had before the decision, so the trainer can start a sequence there.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from cogbert_edge.experience.outbox import Outbox
from cogbert_edge.inference.policy import Decision, State
from cogbert_edge.wire.records import DETERMINISTIC, DONE, TRUNCATED, Record, encode

__all__ = ["ExperienceLog", "Session"]


@dataclass
class _Session:
    next_step: int = 0
    open: deque = field(default_factory=deque)   # Records not yet written



Session = _Session    # one session's logging state; the decision service keeps its own per lane

class ExperienceLog:
    def __init__(self, outbox: Outbox, *, model: str, snapshot_every: int = 64, reward_delay: int = 0) -> None:
        self.outbox = outbox
        self.model = model
        self.snapshot_every = snapshot_every
        self.reward_delay = reward_delay
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.late_rewards = 0
        self.refused = 0      # records the outbox refused (full disk)

    def decision(self, session: str, obs: np.ndarray, d: Decision, state_before: State, *,
                 deterministic: bool = False, model: str | None = None, timestamp: float | None = None) -> int:
        """Record a decision; returns its step number within the session."""
        with self._lock:
            s = self._sessions.get(session)
            if s is None:
                s = self._sessions[session] = _Session()
            step = s.next_step
            s.next_step += 1
            snap = step % self.snapshot_every == 0
            r = Record(session, step, np.asarray(obs, np.float32), d.action, d.log_prob, d.value,
                       model or self.model, time.time() if timestamp is None else timestamp,
                       flags=DETERMINISTIC if deterministic else 0,
                       h=state_before.h if snap else None, c=state_before.c if snap else None)
            s.open.append(r)
            ready = self._close_oldest(s, keep=self.reward_delay + 1)
        self._write(ready)
        return step

    def reward(self, session: str, value: float, *, done: bool = False, truncated: bool = False,
               step: int | None = None) -> None:
        with self._lock:
            s = self._sessions.get(session)
            target = None
            if s is not None and s.open:
                target = s.open[-1] if step is None else next((r for r in s.open if r.step == step), None)
            if s is None or target is None:   # (target is None whenever s is)
                self.late_rewards += 1
                return
            target.reward += float(value)
            if done:
                target.flags |= DONE
            if truncated:
                target.flags |= TRUNCATED
            ready = self._close_oldest(s, keep=0) if (done or truncated) else []
            if done or truncated:
                del self._sessions[session]   # the next decision starts a new episode at step 0
        self._write(ready)

    def end_session(self, session: str) -> None:
        with self._lock:
            s = self._sessions.pop(session, None)
            ready = list(s.open) if s else []
        self._write(ready)

    def flush(self) -> None:
        """Write every open decision (rewards arriving later for them are dropped)."""
        with self._lock:
            ready = [r for s in self._sessions.values() for r in s.open]
            for s in self._sessions.values():
                s.open.clear()
        self._write(ready)

    def _close_oldest(self, s: _Session, keep: int) -> list[Record]:
        ready = []
        while len(s.open) > keep:
            ready.append(s.open.popleft())
        return ready

    def _write(self, records: list[Record]) -> None:
        for r in records:
            if self.outbox.append(encode(r)) is None:
                self.refused += 1
