"""One agent of a multi-agent site: a station's device that decides with its role's policy and
coordinates with the other agents of its site through the broker.

Every step the agent

1. runs its role's actor on its local observation plus its one-hot agent id (:func:`actor_input`,
   what the trainer fed it), which proposes an action;
2. publishes an :class:`~cogbert_edge.wire.messages.AgentMessage` (its proposal, whether it claims
   the shared maintenance crew, the wear sensor reading that ranks the claim);
3. **centralized mode**: waits up to ``deadline_ms`` for the coordinator's
   :class:`~cogbert_edge.wire.messages.SiteDecision` for this step; a denied claim becomes ``WORK``
   (the station produces instead of losing the period);
4. **decentralized mode**, or when no decision arrived in time (the coordinator is down or
   late): resolves the claims itself from the messages of this step it has (the same rule as the
   coordinator and the simulator: highest sensor first, ties to the lower index; a peer whose
   message is missing counts as not claiming) and acts on that.

So an agent never stops deciding: without a coordinator or a neighbour it degrades to its own
observation and the latest messages it has (``docs/multi-agent.md``, "Graceful degradation").
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_edge.device import Device
from cogbert_edge.errors import ConfigError, WireError
from cogbert_edge.inference.policy import Policy
from cogbert_edge.link.mqtt import LinkSettings, Message, MqttLink
from cogbert_edge.wire.messages import AgentMessage, SiteDecision
from cogbert_edge.wire.topics import check_device_id, check_fleet, check_site, site_filter, site_topic

__all__ = ["IDLE", "WORK", "MAINTAIN", "SENSOR_INDEX", "CREW_FREE_INDEX", "actor_input", "resolve_claims",
           "SiteAgentSettings", "SiteAgent", "StepResult"]

# The production line's actions and where its observation holds the wear sensor
# (cogbert_cloud.learn.envs.production_line; a test holds the two equal).
IDLE, WORK, MAINTAIN = 0, 1, 2
SENSOR_INDEX, CREW_FREE_INDEX = 4, 5


def actor_input(obs: Any, agent_index: Any, n_agents: int) -> np.ndarray:
    """A role actor's input: the local observation ``[..., obs_dim]`` and the one-hot agent id."""
    obs = np.asarray(obs, np.float32)
    onehot = np.zeros(obs.shape[:-1] + (n_agents,), np.float32)
    idx = np.broadcast_to(np.asarray(agent_index), obs.shape[:-1])
    np.put_along_axis(onehot, idx[..., None].astype(np.int64), 1.0, axis=-1)
    return np.concatenate([obs, onehot], axis=-1)


def resolve_claims(claims: dict[str, tuple[float, int]], free: int) -> set[str]:
    """The claimants the crew serves: ``claims`` maps a member to ``(sensor, index)``; the
    ``free`` highest sensor readings win, ties to the lower index."""
    order = sorted(claims, key=lambda m: (-claims[m][0], claims[m][1]))
    return set(order[:max(0, free)])


@dataclass
class SiteAgentSettings:
    device_id: str
    fleet: str
    site: str
    members: list[str]              # the site's agents, in agent-index order
    coordinator: str
    broker: str
    pki: Path
    mode: str = "centralized"       # or "decentralized"
    deadline_ms: float = 50.0
    crews: int = 1

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        check_fleet(self.fleet)
        check_site(self.site)
        check_device_id(self.coordinator)
        for m in self.members:
            check_device_id(m)
        if self.device_id not in self.members:
            raise ConfigError(f"{self.device_id} is not one of the site's members {self.members}")
        if self.mode not in ("centralized", "decentralized"):
            raise ConfigError(f"mode must be 'centralized' or 'decentralized', got {self.mode!r}")
        if not self.deadline_ms > 0:
            raise ConfigError(f"deadline_ms must be > 0, got {self.deadline_ms}")

    @property
    def index(self) -> int:
        return self.members.index(self.device_id)


@dataclass
class StepResult:
    step: int
    action: int
    proposed: int
    mode: str                       # "coordinated", "decentralized" or "fallback" (no decision in time)
    round_trip_ms: float | None     # publish -> decision, when a decision came
    peers_heard: int
    logged_step: int | None = None  # the step in the device's log (with a device)


@dataclass
class _Stats:
    steps: int = 0
    coordinated: int = 0
    fallback: int = 0
    decentralized: int = 0
    errors: int = 0
    bad_messages: int = 0
    round_trips_ms: deque = field(default_factory=lambda: deque(maxlen=4096))


class SiteAgent:
    """An agent of a site (see the module docstring); ``policy`` is its role's actor."""

    def __init__(self, settings: SiteAgentSettings, policy: Policy | None = None, *, device: Device | None = None,
                 link: MqttLink | None = None) -> None:
        """Decide with ``policy`` (nothing logged), or through ``device`` (a started
        :class:`~cogbert_edge.device.Device`: every decision logged for the cloud with the session
        and step the site's experience is joined on, over the device's own link)."""
        if (policy is None) == (device is None):
            raise ConfigError("a site agent decides with a policy or through a device: give exactly one")
        self.s = settings
        self.device = device
        self.policy = device.policy if device is not None else policy
        assert self.policy is not None
        self.state = self.policy.initial_state()
        self.n_agents = len(settings.members)
        if device is not None:
            link = device.link
        self.link = link or MqttLink(LinkSettings.for_device(settings.broker, settings.pki, settings.device_id,
                                                             backoff_min=0.05, backoff_max=1.0),
                                     name=f"site-{settings.device_id}")
        self._cv = threading.Condition()
        self._msgs: dict[int, dict[str, AgentMessage]] = {}
        self._decisions: dict[int, SiteDecision] = {}
        self.stats = _Stats()

    def start(self, timeout: float = 10.0) -> SiteAgent:
        if self.device is None:
            self.link.start()
        self.link.wait_connected(timeout)
        h1 = self.link.subscribe(site_filter(self.s.fleet, self.s.site, "msg"), self._on_msg, qos=0)
        h2 = self.link.subscribe(site_filter(self.s.fleet, self.s.site, "decision"), self._on_decision, qos=0)
        h1.wait(timeout)
        h2.wait(timeout)
        return self

    def close(self) -> None:
        if self.device is None:
            self.link.close()

    def __enter__(self) -> SiteAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- incoming -----------------------------------------------------------------------------

    def _on_msg(self, m: Message) -> None:
        try:
            msg = AgentMessage.decode(m.payload)
        except WireError:
            self.stats.bad_messages += 1
            return
        if msg.agent not in self.s.members or not m.topic.endswith(f"/{msg.agent}/msg"):
            self.stats.bad_messages += 1     # a member may speak only for itself (the ACL enforces it too)
            return
        with self._cv:
            self._msgs.setdefault(msg.step, {})[msg.agent] = msg
            self._cv.notify_all()

    def _on_decision(self, m: Message) -> None:
        if not m.topic.endswith(f"/{self.s.coordinator}/decision"):
            self.stats.bad_messages += 1
            return
        try:
            d = SiteDecision.decode(m.payload)
        except WireError:
            self.stats.bad_messages += 1
            return
        with self._cv:
            self._decisions[d.step] = d
            self._cv.notify_all()

    # -- one step -----------------------------------------------------------------------------

    def step(self, step: int, obs: Any, session: str | None = None) -> StepResult:
        """Decide step ``step`` from the local observation ``obs``; never blocks past the deadline.

        With a device, the decision is logged in ``session`` (one per site episode, the same name
        at every agent of the site); the log holds the *proposed* action and its behaviour
        log-probability: a claim the crew denies is, from the agent's side, what its environment
        did, so the proposal is the action whose probability off-policy corrections need."""
        obs = np.asarray(obs, np.float32)
        x = actor_input(obs, self.s.index, self.n_agents)
        logged_step = None
        if self.device is not None:
            ld = self.device.act(session or self.s.site, x)
            proposed, logged_step = int(ld.action), ld.step
        else:
            assert self.policy is not None
            d = self.policy.act(x, self.state)
            self.state = d.state
            proposed = int(d.action)
        claim = proposed == MAINTAIN
        sensor = float(obs[SENSOR_INDEX])
        # Free crews as this station sees them (the observation's crew_free entry).
        free = int(round(float(obs[CREW_FREE_INDEX]) * self.s.crews))
        msg = AgentMessage(step, self.s.device_id, proposed, claim, sensor, free, time.time_ns())
        t0 = time.monotonic()
        try:
            self.link.publish(site_topic(self.s.fleet, self.s.site, self.s.device_id, "msg"), msg.encode(), qos=0)
        except Exception:   # a closed or broken link: decide alone (counted)
            self.stats.errors += 1
        with self._cv:
            self._msgs.setdefault(step, {})[self.s.device_id] = msg
        deadline = t0 + self.s.deadline_ms / 1000.0
        decision: SiteDecision | None = None
        with self._cv:
            while True:
                if self.s.mode == "centralized":
                    decision = self._decisions.get(step)
                    if decision is not None:
                        break
                elif len(self._msgs.get(step, {})) == self.n_agents:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            heard = dict(self._msgs.get(step, {}))
        rtt = None
        if decision is not None:
            rtt = (time.monotonic() - t0) * 1000.0
            self.stats.round_trips_ms.append(rtt)
            mode = "coordinated"
            granted = self.s.device_id in decision.granted
            self.stats.coordinated += 1
        else:
            mode = "decentralized" if self.s.mode == "decentralized" else "fallback"
            if mode == "fallback":
                self.stats.fallback += 1
            else:
                self.stats.decentralized += 1
            claims = {a: (m.sensor, self.s.members.index(a)) for a, m in heard.items() if m.claim}
            granted = self.s.device_id in resolve_claims(claims, free)
        action = proposed
        if claim and not granted:
            action = WORK    # produce instead of waiting for a crew that went elsewhere
        self.stats.steps += 1
        self._forget(step)
        return StepResult(step, action, proposed, mode, rtt, len(heard) - 1, logged_step)

    @property
    def policy_model_id(self) -> str:
        """The model deciding now (a device's changes when it installs a release)."""
        policy = self.device.policy if self.device is not None else self.policy
        return policy.model_id if policy is not None else ""

    def reward(self, session: str, value: float, *, step: int | None = None, done: bool = False,
               truncated: bool = False) -> None:
        """The team reward of a logged decision (only with a device)."""
        if self.device is None:
            raise ConfigError("rewards are logged only by a site agent that decides through a device")
        self.device.reward(session, value, step=step, done=done, truncated=truncated)

    def _forget(self, step: int) -> None:
        with self._cv:
            for k in [k for k in self._msgs if k < step - 8]:
                del self._msgs[k]
            for k in [k for k in self._decisions if k < step - 8]:
                del self._decisions[k]

    def metrics(self) -> dict[str, Any]:
        rt = np.array(self.stats.round_trips_ms) if self.stats.round_trips_ms else None
        return {"device": self.s.device_id, "site": self.s.site, "steps": self.stats.steps,
                "coordinated": self.stats.coordinated, "fallback": self.stats.fallback,
                "decentralized": self.stats.decentralized, "errors": self.stats.errors,
                "bad_messages": self.stats.bad_messages,
                "round_trip_ms_p50": float(np.percentile(rt, 50)) if rt is not None else None,
                "round_trip_ms_p99": float(np.percentile(rt, 99)) if rt is not None else None}
