"""Lanes: the service's members of the fleet. Each is a device to the rest of Cogbert.

A replica serves its sessions through a few *lanes*; a session's lane is a hash of its id.
Each lane has a device identity of the fleet's PKI (``pki/devices/{lane}/``) and everything a
device has, composed as :class:`cogbert_edge.Device` composes it: an update agent that verifies
signed releases exactly as a device does (root chain, anti-rollback counter, hash, golden
outputs, a trial with automatic rollback) and swaps them in; an experience log, a durable
outbox and an uploader over mutual-TLS MQTT, so ingestion stores each decision exactly once;
status reports and telemetry on the lane's topics. The rollout controller therefore treats
lanes as it treats devices: it buckets them into canary and control cohorts by their id, offers
a candidate to canary lanes, compares their telemetry with the control lanes', and promotes or
rolls back. Because a session's lane is a hash of the session id, cohorts are cohorts of
sessions, and a session never changes model mid-episode: it keeps the model it started on
until it ends (see ``docs/decision-service.md``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_edge import __version__
from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError
from cogbert_edge.experience.log import ExperienceLog, Session
from cogbert_edge.experience.outbox import Outbox, OutboxSettings
from cogbert_edge.experience.uploader import Uploader, UploaderSettings
from cogbert_edge.inference.bundle import FORMAT_VERSION, load_bundle
from cogbert_edge.inference.policy import Decision, Policy, State
from cogbert_edge.link.mqtt import LinkSettings, LinkState, MqttLink
from cogbert_edge.update.agent import UpdateAgent, UpdateSettings
from cogbert_edge.update.trust import Release, TrustedState, VerificationError
from cogbert_edge.wire.messages import OutboxTelemetry, StatusReport, Telemetry, UploaderTelemetry
from cogbert_edge.wire.topics import check_device_id, device_topic, fleet_release

__all__ = ["Lane", "LaneSettings", "verify_startup_release", "lane_of"]

log = logging.getLogger("cogbert.decide")
SDK_VERSION = tuple(int(x) for x in __version__.split("."))


def lane_of(session: str, n: int) -> int:
    """The lane index of a session: stable across replicas and restarts."""
    return int.from_bytes(hashlib.sha256(session.encode()).digest()[:8], "little") % n


def verify_startup_release(trust_root: bytes, manifest: bytes, bundle: bytes, *, model: str,
                           fleet: str) -> Release:
    """The checks an update agent makes on an offered release (signatures by the current
    release keys, expiry, model and fleet, SDK compatibility, the bundle's length and sha256,
    a strict load, the bundle's shapes against the manifest's), for the release a replica boots
    with. The anti-rollback counter is the lanes' own, kept by their update agents."""
    trust = TrustedState(trust_root, now=dt.datetime.now(dt.timezone.utc))
    release = trust.verify_release(manifest, model=model, fleet=fleet, highest_counter=0,
                                   sdk_format_version=FORMAT_VERSION, sdk_version=SDK_VERSION)
    TrustedState.verify_bundle(release, bundle)
    b = load_bundle(bundle)
    c = release.compat
    if (c["architecture"] != "lstm-ac" or b.config.obs_dim != c["obs_dim"] or b.config.hidden != c["hidden"]
            or {"kind": b.config.action.kind, "size": b.config.action.size} != c["action"]):
        raise VerificationError("incompatible", "the bundle's shape differs from its manifest's")
    return release


class _ServiceLog(ExperienceLog):
    """The device's experience log, with the step taken from the session (a session that moved
    here from another replica continues its numbering; its first record here carries the state,
    so the trainer can start a sequence on it)."""

    def decision_at(self, session: str, step: int, obs: np.ndarray, d: Decision, state_before: State, *,
                    model: str, deterministic: bool = False) -> int:
        with self._lock:
            s = self._sessions.get(session)
            fresh = s is None or s.next_step != step
        if not fresh:
            return self.decision(session, obs, d, state_before, deterministic=deterministic, model=model)
        self.end_session(session)       # what it had open here is written; numbering goes on at ``step``
        with self._lock:
            s = self._sessions[session] = Session()
            s.next_step = step
            # The first record here carries the state before it, whatever its step: the
            # log's rule is ``step % snapshot_every == 0``, so for this one record the period
            # is the step itself. (One thread decides; the log reads the period under its lock.)
            every, self.snapshot_every = self.snapshot_every, max(step, 1)
        try:
            return self.decision(session, obs, d, state_before, deterministic=deterministic, model=model)
        finally:
            self.snapshot_every = every


@dataclass
class LaneSettings:
    fleet: str
    spool: Path
    factory_bundle: Path          # the verified startup release's bundle
    trust_root: bytes
    model_name: str = "cogbert"
    backend: str | None = None
    broker: str | None = None     # the broker's device listener; None: log to the outbox only
    pki: Path | None = None
    snapshot_every: int = 64
    reward_delay: int = 0
    telemetry_interval: float = 10.0
    trial_decisions: int = 200
    trial_seconds: float = 5.0


class Lane:
    def __init__(self, device_id: str, s: LaneSettings) -> None:
        check_device_id(device_id)
        self.id, self.s = device_id, s
        spool = Path(s.spool) / device_id
        self.updater = UpdateAgent(UpdateSettings(directory=spool / "update", model=s.model_name, fleet=s.fleet,
                                                  trial_decisions=s.trial_decisions, trial_seconds=s.trial_seconds),
                                   s.trust_root, factory_bundle=s.factory_bundle, backend=s.backend)
        self.policy, self._boot_note = self.updater.boot()
        self.outbox = Outbox(OutboxSettings(directory=spool / "outbox"))
        self.log = _ServiceLog(self.outbox, model=self.policy.model_id, snapshot_every=s.snapshot_every,
                               reward_delay=s.reward_delay)
        self.link: MqttLink | None = None
        self.uploader: Uploader | None = None
        if s.broker:
            if s.pki is None:
                raise ConfigError("a lane with a broker needs the PKI directory (--pki) for its identity")
            self.link = MqttLink(LinkSettings.for_device(s.broker, Path(s.pki), device_id), name=device_id)
            self.uploader = Uploader(self.outbox, self.link, fleet=s.fleet, device=device_id,
                                     settings=UploaderSettings())
        self._lock = threading.Lock()
        self._lat: list[float] = []
        self.decisions = self.errors = self.nonfinite = self.fallbacks = self.swaps = self.state_resets = 0
        self.reward_sum, self.reward_count = 0.0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.models: dict[str, Policy] = {self.policy.model_id: self.policy}   # in use by sessions
        self.seen: set[str] = {self.policy.model_id}
        self.retired: set[str] = set()

    def start(self) -> Lane:
        self.updater.attach(swap=self.swap, report=self._report_status)
        if self.link is not None and self.uploader is not None:
            self.link.start()
            self.uploader.start()
            updater = self.updater

            def on_release(m: Any) -> None:
                updater.on_message(m.payload, self.policy)

            self.link.subscribe(device_topic(self.s.fleet, self.id, "release"), on_release)
            self.link.subscribe(fleet_release(self.s.fleet), on_release)
            if self._boot_note:
                updater._status(None, self._boot_note)
            self._thread = threading.Thread(target=self._telemetry_loop, name=f"cogbert-telemetry-{self.id}",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Write the decisions still waiting for rewards, stop uploading (what is not uploaded
        yet is sent by the next process with this lane's spool), close the outbox."""
        self._stop.set()
        self.log.flush()
        if self.uploader is not None:
            deadline = time.monotonic() + 5.0    # a short drain, so a rolling restart leaves little behind
            while not self.drained() and time.monotonic() < deadline and self.link \
                    and self.link.state is LinkState.CONNECTED:
                time.sleep(0.05)
            self.uploader.stop()
        if self.link is not None:
            self.link.close()
        self.outbox.close()

    def drained(self) -> bool:
        return self.uploader is not None and self.uploader.idle() and self.outbox.acked_seq >= self.outbox.last_seq

    # -- models -----------------------------------------------------------------------------

    def swap(self, policy: Policy) -> None:
        """New sessions start on ``policy``; running sessions keep the model they started on."""
        with self._lock:
            recent = self._lat[-500:]
        self.updater.baseline_latency_us = np.asarray(recent) * 1e6 if len(recent) >= 20 else None
        if policy.model_id in self.seen:
            # Back to a model this lane ran before: a rollback (a failed trial, or the rollout's
            # pre-signed rollback release). Sessions on the models it replaces move to it at
            # their next decision, state kept (same architecture); unknown models stay refused.
            self.retired |= set(self.models) - {policy.model_id}
            self.models = {policy.model_id: policy}
        else:
            self.models[policy.model_id] = policy
        self.seen.add(policy.model_id)
        self.policy = policy
        self.swaps += 1
        event(log, "lane_swapped", lane=self.id, model=policy.model_id)

    def model(self, model_id: str) -> Policy | None:
        return self.models.get(model_id)

    # -- what happened ----------------------------------------------------------------------

    def observed(self, policy: Policy, n: int, per_decision_s: float, nonfinite: int, errors: int = 0) -> None:
        """Count ``n`` decisions of one batch on ``policy``; feed a running trial."""
        with self._lock:
            self.decisions += n
            self.errors += errors
            self.nonfinite += nonfinite
            self._lat.append(per_decision_s)
            if len(self._lat) > 4096:
                del self._lat[:2048]
        u = self.updater
        if u.trial is not None:
            fallback = None
            for i in range(n):
                fallback = u.observe(policy, per_decision_s, i >= errors, i >= nonfinite) or fallback
                if u.trial is None:
                    break
            if fallback is not None:
                self.swap(fallback)

    def rewarded(self, value: float) -> None:
        with self._lock:
            self.reward_sum += value
            self.reward_count += 1

    def telemetry(self) -> Telemetry:
        """What a device reports on its telemetry topic, for this lane (the same typed message)."""
        with self._lock:
            lat = list(self._lat)
            decisions, errors = self.decisions, self.errors
        ob = self.outbox.stats()
        up = self.uploader
        return Telemetry(
            device=self.id, model=self.policy.model_id, time=time.time(), decisions=decisions, errors=errors,
            nonfinite=self.nonfinite, reward_sum=self.reward_sum, reward_count=self.reward_count,
            swaps=self.swaps, state_resets=self.state_resets, release=self.updater.current_counter,
            latency_p95_us=float(np.percentile(lat, 95) * 1e6) if lat else None,
            outbox=OutboxTelemetry(pending=ob["pending"], bytes=ob["bytes"], segments=ob["segments"],
                                   last_seq=ob["last_seq"], acked_seq=ob["acked_seq"],
                                   dropped_oldest=ob["dropped_oldest"], dropped_unwritten=ob["dropped_unwritten"]),
            uploader=UploaderTelemetry(sent=up.sent, resent=up.resent, acked=up.acked, rejected=up.rejected)
            if up else UploaderTelemetry(),
            late_rewards=self.log.late_rewards, refused_records=self.log.refused,
            link=self.link.state.value if self.link else "none")

    def _report_status(self, status: StatusReport) -> None:
        if self.link is not None:
            report = status.with_sender(self.id, self.policy.model_id)
            self.link.publish(device_topic(self.s.fleet, self.id, "status"), report.encode(), qos=1)

    def _telemetry_loop(self) -> None:
        topic = device_topic(self.s.fleet, self.id, "telemetry")
        while not self._stop.wait(self.s.telemetry_interval):
            try:
                if self.link is not None:
                    self.link.publish(topic, self.telemetry().encode(), qos=0)
            except Exception as e:  # noqa: BLE001 - telemetry must never hurt serving
                event(log, "telemetry_failed", level=logging.WARNING, lane=self.id, error=str(e))
