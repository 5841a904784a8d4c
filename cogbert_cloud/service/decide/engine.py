"""The decision engine: sessions, state tokens, the micro-batcher and the lanes, without a
transport. ``app.py`` puts HTTP and WebSocket in front of it.

Batching. Decisions of all sessions wait in one queue. The first decision to arrive in an empty
queue schedules a flush with ``call_soon`` (``max_wait_us`` 0, the default) or ``call_later``:
with 0, the batch is everything the event loop read from its sockets in the same iteration, so a
lone decision waits for nothing and a burst is batched by what arrived while the previous batch
ran. A full batch (``max_batch``) flushes at once. A batch is split by model (a session keeps the
model it started on) and each part is one ``Policy.act_batch`` call into the backend's batch
step. A decision still queued past its deadline gets the fallback action (``fallback: true``,
logged as a deterministic decision, state unchanged) or 503; a full queue answers 503 with
Retry-After at once.

Sampling. The uniform number that picks a session's action at step ``k`` is a keyed hash of
(session, k), not a draw from one process's generator: a session gives the same actions on any
replica, and the same as one ``Policy`` handed the same numbers (``tests/test_decide.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from cogbert_cloud.service.decide.auth import Client, ClientRegistry
from cogbert_cloud.service.decide.config import DecideSettings
from cogbert_cloud.service.decide.errors import (
    BadRequest,
    DeadlineExceeded,
    DecideError,
    NotReady,
    Overloaded,
    TokenError,
    TooLarge,
    UnknownSession,
)
from cogbert_cloud.service.decide.lanes import Lane, LaneSettings, lane_of, verify_startup_release
from cogbert_cloud.service.decide.metrics import Metrics
from cogbert_cloud.service.decide.sessions import Session, SessionCache
from cogbert_cloud.service.decide.tokens import KeyRing
from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.policy import Decision, Policy, State

__all__ = ["Engine", "ActItem", "uniform_for"]

log = logging.getLogger("cogbert.decide")
_SESSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$")
_U53 = 2.0 ** -53


def session_seed(seed: bytes, session: str) -> int:
    """The session's 64-bit sampling key: a keyed hash of its id (once per session)."""
    return int.from_bytes(hmac.digest(seed, session.encode(), "sha256")[:8], "little")


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def uniforms(keys: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1) for (session key, step) pairs: SplitMix64 of key + step * golden
    ratio, the top 53 bits. Vectorised: a batch's numbers cost a few numpy operations."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + steps.astype(np.uint64) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * _U53


_MASK = (1 << 64) - 1


def _uniform_one(key: int, step: int) -> float:
    """:func:`uniforms` for one pair in Python integers (a dozen numpy calls on 1-element arrays
    cost ~25 µs; this ~1 µs), bit for bit the same number."""
    z = (key + step * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return (z >> 11) * _U53


def uniform_for(seed: bytes, session: str, step: int) -> float:
    """The uniform in [0, 1) that samples ``session``'s action at ``step``, on every replica."""
    return float(uniforms(np.array([session_seed(seed, session)], np.uint64), np.array([step], np.uint64))[0])


class _Uniforms:
    """What ``Policy.act_batch`` draws its uniforms from: one per row, given."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = u

    def random(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.u.reshape(shape)


class _Request:
    """The decisions of one request: answered together when the last one is done."""

    __slots__ = ("future", "results", "left")

    def __init__(self, future: asyncio.Future, n: int) -> None:
        self.future, self.left = future, n
        self.results: list[dict | None] = [None] * n


@dataclass(eq=False)
class ActItem:
    """One decision asked for: parsed and checked by the transport."""

    session: str
    obs: np.ndarray                    # float32 [obs_dim], finite
    token: bytes | str | None = None
    deterministic: bool = False
    want_state: bool = True
    t0: float = field(default_factory=time.perf_counter)
    deadline: float = 0.0
    entry: Session | None = None
    request: _Request | None = None
    index: int = 0


class Engine:
    def __init__(self, s: DecideSettings) -> None:
        self.s = s
        if not (s.trust_root and s.manifest and s.bundle):
            raise ConfigError("the service serves signed releases only: give trust_root, manifest and bundle")
        root = Path(s.trust_root).read_bytes()
        release = verify_startup_release(root, Path(s.manifest).read_bytes(), Path(s.bundle).read_bytes(),
                                         model=s.model_name, fleet=s.fleet)
        self.release = release
        ls = LaneSettings(fleet=s.fleet, spool=Path(s.spool), factory_bundle=Path(s.bundle), trust_root=root,
                          model_name=s.model_name, backend=s.backend, broker=s.broker, pki=s.pki,
                          snapshot_every=s.snapshot_every, reward_delay=s.reward_delay,
                          telemetry_interval=s.telemetry_interval, trial_decisions=s.trial_decisions,
                          trial_seconds=s.trial_seconds)
        self.lanes = [Lane(name, ls) for name in s.lanes]
        if not s.state_keys:
            raise ConfigError("no state-token keys: set COGBERT_DECIDE_STATE_KEYS (or --state-keys) to "
                              "ID:HEX,... with the same keys on every replica")
        self.keys = KeyRing.parse(s.state_keys, max_age=s.token_max_age)
        self.seed = hmac.digest(self.keys.keys[self.keys.signing], b"cogbert-decide-sampling", "sha256")
        if not s.clients:
            raise ConfigError("every request is authenticated: give the clients file (--clients), made with "
                              "`cogbert cloud decide token`")
        self.clients: ClientRegistry | None = ClientRegistry.load(Path(s.clients), s.fleet)
        self.cache = SessionCache(max_bytes=s.session_cache_bytes, idle_seconds=s.session_idle_seconds)
        self.metrics = Metrics(self)
        self._queue: list[ActItem] = []
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.ready = False
        self.fallback = s.fallback_action
        cfg = self.lanes[0].policy.config
        self.obs_dim, self.hidden = cfg.obs_dim, cfg.hidden
        if self.fallback is not None and not (cfg.action.discrete and 0 <= self.fallback < cfg.action.size):
            raise ConfigError(f"fallback_action {self.fallback} is not an action of this model")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Engine:
        for lane in self.lanes:
            lane.start()
        self.ready = True
        event(log, "decide_ready", lanes=[x.id for x in self.lanes], model=self.lanes[0].policy.model_id,
              counter=self.release.counter)
        return self

    def close(self) -> None:
        """Stop taking decisions, then flush every lane's log (what was decided is kept)."""
        self.ready = False
        self.draining = True
        for lane in self.lanes:
            lane.close()
        event(log, "decide_stopped", last_seqs={x.id: x.outbox.last_seq for x in self.lanes})

    def authenticate(self, header: bytes | None) -> Client:
        if self.clients is None:
            raise ConfigError("no clients file")   # the app refuses to start without one
        return self.clients.authenticate(header)

    # -- sessions ---------------------------------------------------------------------------

    def check_session(self, name: object) -> str:
        if not isinstance(name, str) or not _SESSION.match(name):
            raise BadRequest("session must be 1-64 characters of letters, digits and _ . : - "
                             "(starting with a letter or digit)")
        return name

    def start_session(self, client: Client, name: str | None = None) -> dict:
        if not self.ready:
            raise NotReady("no verified model loaded yet")
        name = uuid.uuid4().hex if name is None else self.check_session(name)
        lane = self.lanes[lane_of(name, len(self.lanes))]
        policy = lane.policy
        old = self.cache.get(client.name, name)
        if old is not None and old.busy:
            raise BadRequest(f"session {name!r} has decisions in flight; end it first")
        if old is not None:
            lane.log.end_session(name)
        h = np.zeros(self.hidden, np.float32)
        entry = Session(client.name, name, lane, policy, policy.model_id, h, h.copy(),
                        key=session_seed(self.seed, name))
        self.cache.put(entry)
        out = {"session": name, "model": policy.model_id, "lane": lane.id, "step": 0}
        out["state"] = self.keys.seal(client.name, name, policy.model_id, 0, entry.h, entry.c)
        return out

    def end_session(self, client: Client, name: str) -> dict:
        name = self.check_session(name)
        entry = self.cache.pop(client.name, name)
        lane = self.lanes[lane_of(name, len(self.lanes))]
        lane.log.end_session(name)
        return {"session": name, "ended": entry is not None}

    def reward(self, client: Client, name: str, value: float, *, step: int | None = None, done: bool = False,
               truncated: bool = False, token: bytes | str | None = None) -> dict:
        name = self.check_session(name)
        entry = self.cache.get(client.name, name)
        if entry is None:
            if token is None:
                raise UnknownSession(f"session {name!r} is not known here; send its state token")
            self.keys.open(token, client.name, name)   # proves the session is the client's
        lane = self.lanes[lane_of(name, len(self.lanes))]
        lane.log.reward(name, value, step=step, done=done, truncated=truncated)
        lane.rewarded(value)
        out: dict[str, Any] = {"session": name}
        if (done or truncated) and entry is not None and not entry.busy:
            # A new episode: the initial state, step 0, and the lane's current model.
            entry.policy, entry.model = lane.policy, lane.policy.model_id
            entry.h, entry.c, entry.step = np.zeros(self.hidden, np.float32), np.zeros(self.hidden, np.float32), 0
            out["state"] = self.keys.seal(client.name, name, entry.model, 0, entry.h, entry.c)
        return out

    # -- deciding ---------------------------------------------------------------------------

    async def act(self, client: Client, items: list[ActItem]) -> list[dict]:
        """Decide every item; raises DecideError only for what fails before any is queued."""
        if not self.ready:
            raise NotReady("no verified model loaded yet" if not self.draining else "shutting down")
        if len(items) > self.s.max_items:
            raise TooLarge(f"{len(items)} decisions in one request; the limit is {self.s.max_items}")
        if len(self._queue) + len(items) > self.s.max_queue:
            self.metrics.overloaded.inc()
            raise Overloaded(f"{len(self._queue)} decisions are queued and {len(items)} more asked for; the queue "
                             f"holds {self.s.max_queue}", retry_after=1.0)
        client.take(len(items))
        loop = self._loop = asyncio.get_running_loop()   # the current loop (a server may be restarted)
        for it in items:        # resolve every session first: a bad one fails the request before any decides
            it.entry = self._resolve(client, it)
        deadline = time.perf_counter() + self.s.deadline_ms / 1e3
        req = _Request(loop.create_future(), len(items))     # one future a request, not a decision
        for i, it in enumerate(items):
            it.deadline = deadline
            it.request, it.index = req, i
            entry = it.entry
            assert entry is not None
            if entry.busy:
                entry.waiting.append(it)   # after the decision in flight: ordered per session
            else:
                entry.busy = True
                self._enqueue(it)
        return await req.future

    def _resolve(self, client: Client, it: ActItem) -> Session:
        if it.token is not None:
            lane = self.lanes[lane_of(it.session, len(self.lanes))]
            tok = self.keys.open(it.token, client.name, it.session)
            if tok.h.shape[0] != self.hidden:
                raise TokenError(f"state token holds a state of size {tok.h.shape[0]}; this model's is {self.hidden}")
            policy = lane.model(tok.model)
            if policy is None:
                if tok.model not in lane.retired:
                    raise TokenError(f"state token is for model {tok.model!r}, which this service does not serve; "
                                     "start a new session")
                policy = lane.policy     # rolled back: the session moves to the lane's model, state kept
            entry = self.cache.get(client.name, it.session)
            if entry is None:
                entry = Session(client.name, it.session, lane, policy, policy.model_id, tok.h.copy(), tok.c.copy(),
                                tok.step, key=session_seed(self.seed, it.session))
                self.cache.put(entry)
            elif not entry.busy:
                entry.policy, entry.model = policy, policy.model_id
                entry.h, entry.c, entry.step = tok.h.copy(), tok.c.copy(), tok.step
            return entry
        entry = self.cache.get(client.name, it.session)
        if entry is None:
            raise UnknownSession(f"session {it.session!r} is not known on this replica (never started, ended, "
                                 "or evicted): send its state token, or start it again")
        if entry.model not in entry.lane.models:
            entry.policy = entry.lane.policy       # its model was rolled back: move on, state kept
            entry.model = entry.policy.model_id
        return entry

    def _enqueue(self, it: ActItem) -> None:
        self._queue.append(it)
        if len(self._queue) >= self.s.max_batch:
            if not self._scheduled:
                self._scheduled = True
                cast(asyncio.AbstractEventLoop, self._loop).call_soon(self._flush)
        elif not self._scheduled:
            self._scheduled = True
            loop = cast(asyncio.AbstractEventLoop, self._loop)
            if self.s.max_wait_us:
                loop.call_later(self.s.max_wait_us / 1e6, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue:
            batch, self._queue = self._queue[:self.s.max_batch], self._queue[self.s.max_batch:]
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a bug must fail these requests, not the loop
                log.exception("batch failed")
                for it in batch:
                    self._finish(it, e)

    def _run(self, batch: list[ActItem]) -> None:
        now = time.perf_counter()
        m = self.metrics
        groups: dict[tuple[int, bool], list[ActItem]] = {}
        m.queue_wait.observe(now - batch[0].t0)     # the longest wait in the batch (it is FIFO)
        for it in batch:
            if now > it.deadline:
                self._expired(it)
                continue
            entry = cast(Session, it.entry)
            groups.setdefault((id(entry.policy), it.deterministic), []).append(it)
        for (_, deterministic), items in groups.items():
            self._decide(cast(Session, items[0].entry).policy, items, deterministic)

    def _decide(self, policy: Policy, items: list[ActItem], deterministic: bool) -> None:
        n = len(items)
        entries = [cast(Session, it.entry) for it in items]
        if n == 1:      # a lone decision (light load): no numpy call that a view or an int can replace
            e0 = entries[0]
            obs, h, c = items[0].obs[None, :].copy(), e0.h[None, :], e0.c[None, :]
            u = np.array([_uniform_one(e0.key, e0.step)])
        else:
            obs = np.stack([it.obs for it in items])
            h = np.stack([e.h for e in entries])
            c = np.stack([e.c for e in entries])
            u = uniforms(np.fromiter((e.key for e in entries), np.uint64, n),
                         np.fromiter((e.step for e in entries), np.uint64, n))
        t0 = time.perf_counter()
        d = policy.act_batch(obs, State(h, c), deterministic=deterministic, rng=cast(Any, _Uniforms(u[:, None])))
        compute = time.perf_counter() - t0
        self.metrics.batch_size.observe(n)
        self.metrics.compute.observe(compute)
        actions, logps, values = d.action.tolist(), d.log_prob.tolist(), d.value.tolist()
        h2, c2 = d.state.h, d.state.c
        finite = [math.isfinite(v) and math.isfinite(lp) for v, lp in zip(values, logps, strict=True)]
        lanes: dict[int, list] = {}     # lane id -> [lane, decisions, non-finite]
        compute_us = round(compute * 1e6, 1)
        for i, it in enumerate(items):
            e = entries[i]
            step = e.step
            if finite[i]:
                e.lane.log.decision_at(e.name, step, it.obs, Decision(actions[i], logps[i], values[i],
                                                                        State(h2[i], c2[i])),
                                       State(e.h, e.c), model=e.model, deterministic=deterministic)
            e.h, e.c, e.step = h2[i].copy(), c2[i].copy(), step + 1
            count = lanes.setdefault(id(e.lane), [e.lane, 0, 0])
            count[1] += 1
            count[2] += not finite[i]
            out = {"session": e.name, "action": actions[i], "log_prob": logps[i], "value": values[i],
                   "model": e.model, "step": step, "compute_us": compute_us}
            if not finite[i]:
                out["nonfinite"] = True    # not logged: garbage for training (a device counts it the same way)
            if it.want_state:
                out["state"] = self.keys.seal(e.client, e.name, e.model, step + 1, e.h, e.c)
            self._finish(it, out)
        per = compute / n
        for lane, k, bad in lanes.values():
            lane.observed(policy, k, per, nonfinite=bad)
        self.metrics.decisions.inc(n)

    def _expired(self, it: ActItem) -> None:
        e = cast(Session, it.entry)
        self.metrics.expired.inc()
        if self.fallback is None:
            self._finish(it, DeadlineExceeded(f"not decided within {self.s.deadline_ms:g} ms", retry_after=1.0))
            return
        # The fallback: the configured action with probability 1, the state unchanged.
        step = e.step
        d = Decision(self.fallback, 0.0, 0.0, State(e.h, e.c))
        e.lane.log.decision_at(e.name, step, it.obs, d, State(e.h, e.c), model=e.model, deterministic=True)
        e.lane.fallbacks += 1
        e.step = step + 1
        out = {"session": e.name, "action": self.fallback, "log_prob": 0.0, "value": 0.0, "model": e.model,
               "step": step, "fallback": True, "compute_us": 0.0}
        if it.want_state:
            out["state"] = self.keys.seal(e.client, e.name, e.model, step + 1, e.h, e.c)
        self.metrics.fallbacks.inc()
        self._finish(it, out)

    def _finish(self, it: ActItem, result: dict | BaseException) -> None:
        e = cast(Session, it.entry)
        if isinstance(result, dict):
            result["latency_us"] = round((time.perf_counter() - it.t0) * 1e6, 1)
        elif isinstance(result, DecideError):
            result = {"session": it.session, "error": result.code, "message": str(result), "status": result.status,
                      "retry_after": result.retry_after}
        else:
            result = {"session": it.session, "error": "internal", "message": "the decision failed", "status": 500}
        req = cast(_Request, it.request)
        req.results[it.index] = result
        req.left -= 1
        if req.left == 0 and not req.future.done():
            req.future.set_result(req.results)
        # The session's next decision, if one arrived while this one was in flight.
        if e.waiting:
            nxt = e.waiting.pop(0)
            if nxt.token is not None:    # it came with its own token: that state is authoritative
                try:
                    self._resolve_waiting(nxt)
                except DecideError as err:
                    self._finish(nxt, err)
                    return
            self._enqueue(nxt)
        else:
            e.busy = False

    def _resolve_waiting(self, it: ActItem) -> None:
        e = cast(Session, it.entry)
        tok = self.keys.open(cast(bytes, it.token), e.client, e.name)
        policy = e.lane.model(tok.model) or e.policy
        e.policy, e.model, e.h, e.c, e.step = policy, policy.model_id, tok.h.copy(), tok.c.copy(), tok.step

    # -- observing --------------------------------------------------------------------------

    def stats(self) -> dict:
        return {"sessions": len(self.cache), "session_bytes": self.cache.bytes,
                "evicted_idle": self.cache.evicted_idle, "evicted_memory": self.cache.evicted_memory,
                "queued": len(self._queue), "lanes": {x.id: x.telemetry().to_dict() for x in self.lanes}}
