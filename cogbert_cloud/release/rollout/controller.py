"""The rollout controller: one staged rollout at a time, advanced by ``tick()``.

Devices are placed deterministically by a hash of fleet and device id into a bucket in
[0, 100) (:func:`~cogbert_cloud.release.rollout.fleet.bucket`). Buckets at or above
``100 - control_pct`` (and never fewer than ``min_devices`` devices) form the *control
cohort*: they stay on the stable release for the whole rollout. Stage ``k`` (``stages``, e.g.
5 -> 25 -> 100 % of the other devices) offers the candidate to the devices whose bucket falls
below that share, and at least ``min_devices`` of them. Offers are rate-limited
(``notify_rate`` per second).

After ``stage_seconds`` a stage is analysed from what the devices reported since it began
(:func:`~cogbert_cloud.release.rollout.analysis.analyze`). An abort publishes the
pre-signed fleet rollback (a release with a higher counter naming the
stable bundle: the controller holds no signing key), marks the candidate rolled back and
writes the reason to the audit log. Passing the last stage promotes the candidate: it becomes
the fleet's retained release and the stable one in the registry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from cogbert_cloud.data import keys
from cogbert_cloud.data.store import FileStore, ObjectStore
from cogbert_cloud.errors import RolloutConflict
from cogbert_cloud.release.distribution import publish_release
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout.analysis import Verdict, analyze
from cogbert_cloud.release.rollout.fleet import FleetView, bucket
from cogbert_cloud.release.rollout.settings import RolloutSettings
from cogbert_edge._internal import trace
from cogbert_edge._internal.log import event
from cogbert_edge.link.mqtt import MqttLink
from cogbert_edge.wire.messages import Telemetry

__all__ = ["RolloutController", "Rollout", "StageRecord"]

log = logging.getLogger("cogbert.rollout")

RolloutState = Literal["running", "paused", "promoted", "aborted"]


@dataclass(frozen=True)
class StageRecord:
    """A stage's analysis, as it appears on the rollout's timeline."""

    time: float
    stage: int
    pct: int
    verdict: Verdict
    reasons: list[str]
    metrics: dict[str, Any]


@dataclass
class Rollout:
    candidate: int
    stable: int | None
    started: float
    stage_started: float
    state: RolloutState = "running"
    stage: int = 0
    offered: dict[str, float] = field(default_factory=dict)       # device -> when the candidate was offered
    baseline: dict[str, Telemetry] = field(default_factory=dict)  # each device's telemetry at the stage's start
    timeline: list[StageRecord] = field(default_factory=list)
    result: str | None = None
    reasons: list[str] = field(default_factory=list)
    # This rollout's stages and abort thresholds (the service's, with the request's overrides),
    # and the tag its canary and control devices must carry (None: the whole fleet).
    settings: RolloutSettings | None = None
    tag: str | None = None
    trace: dict[str, str] = field(default_factory=dict)   # the release's trace context (W3C headers)

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused")

    def to_dict(self) -> dict[str, Any]:
        """What the operator API shows (the baseline telemetry is internal)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                             if f.name not in ("baseline", "timeline", "offered", "reasons", "settings", "trace")}
        d["offered"] = dict(self.offered)
        d["timeline"] = [asdict(t) for t in self.timeline]
        if self.settings is not None:
            d["settings"] = {k: v for k, v in asdict(self.settings).items() if k != "fleet"}
        if self.reasons:
            d["reasons"] = list(self.reasons)
        return d


# -- the controller ---------------------------------------------------------------------------


class RolloutController:
    """Runs one rollout at a time. ``tick()`` advances it (the service calls it every second)."""

    def __init__(self, settings: RolloutSettings, registry: Registry, link: MqttLink | None,
                 fleet: FleetView, *, clock: Callable[[], float] = time.time,
                 url_for: Callable[[str], str] | None = None) -> None:
        self.s, self.registry, self.link, self.fleet = settings, registry, link, fleet
        self.clock = clock
        self.url_for = url_for or (lambda key: _default_url(registry.store, key))
        self._roots: list[bytes] | None = None    # the root chain, read once per rollout
        self.rollout: Rollout | None = None
        self.history: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._tokens = settings.notify_rate
        self._last_refill = clock()
        self.notifications = 0
        # A device's tags (the service wires this to its tag store; untagged by default).
        self.device_tags: Callable[[str], frozenset[str]] = lambda device: frozenset()

    # -- operator actions -----------------------------------------------------------------

    def start(self, candidate: int, *, actor: str = "system", overrides: dict[str, Any] | None = None,
              tag: str | None = None) -> dict[str, Any]:
        """Start a rollout of ``candidate``. ``overrides`` replace the service's stage and abort
        settings for this rollout only (names of :class:`RolloutSettings` fields); ``tag`` takes
        its canary and control cohorts from the devices with that tag."""
        unknown = set(overrides or {}) - {f.name for f in fields(RolloutSettings)} | ({"fleet"} & set(overrides or {}))
        if unknown:
            raise RolloutConflict(f"not a rollout setting: {', '.join(sorted(unknown))}")
        settings = replace(self.s, **(overrides or {}))
        with self._lock:
            if self.rollout and self.rollout.active:
                raise RolloutConflict(f"rollout of release {self.rollout.candidate} is {self.rollout.state}")
            rec = self.registry.get(candidate)
            if rec["state"] != "candidate":
                raise RolloutConflict(f"release {candidate} is {rec['state']}, not a candidate")
            stable = self.registry.stable()
            now = self.clock()
            self._roots = None        # a rotation since the last rollout shows up in this one
            if tag is not None and not any(tag in self.device_tags(d) for d in self.fleet.snapshot()):
                raise RolloutConflict(f"no device that has reported carries the tag {tag!r}")
            self.rollout = Rollout(candidate, stable["counter"] if stable else None, started=now, stage_started=now,
                                   baseline=self._telemetry_now(), settings=settings, tag=tag,
                                   trace=dict(rec.get("trace") or {}))
            self.registry.set_state(candidate, "canary", actor=actor)
            self._log("rollout_started", actor=actor, tag=tag, overrides=dict(overrides or {}))
            return self.status()

    def pause(self, *, actor: str = "operator") -> dict[str, Any]:
        return self._set("paused", "running", actor)

    def resume(self, *, actor: str = "operator") -> dict[str, Any]:
        with self._lock:
            if self.rollout and self.rollout.state == "paused":
                self.rollout.stage_started = self.clock()
                self.rollout.baseline = self._telemetry_now()
        return self._set("running", "paused", actor)

    def abort(self, reason: str = "operator", *, actor: str = "operator") -> dict[str, Any]:
        with self._lock:
            if not self.rollout or not self.rollout.active:
                raise RolloutConflict("no rollout in progress")
            self._abort([reason], actor)
            return self.status()

    def status(self) -> dict[str, Any]:
        return {} if self.rollout is None else self.rollout.to_dict()

    # -- the loop -------------------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            r = self.rollout
            if r is None or r.state != "running":
                return
            now = self.clock()
            s = self._settings(r)
            self._offer_stage(r, now)
            if now - r.stage_started < s.stage_seconds:
                return
            res = analyze(s, canary=r.offered, control=self._control(), devices=self.fleet.snapshot(),
                          baseline=r.baseline, candidate_counter=r.candidate, stage_started=r.stage_started, now=now)
            if res.verdict == "wait":
                return
            r.timeline.append(StageRecord(now, r.stage, s.stages[r.stage], res.verdict, res.reasons, res.metrics))
            self._trace_stage(r, s.stages[r.stage], res.verdict, res.reasons, now)
            self._log("stage_analysed", stage=r.stage, verdict=res.verdict, reasons=res.reasons, metrics=res.metrics)
            if res.verdict == "abort":
                self._abort(res.reasons, "controller")
            elif r.stage + 1 < len(s.stages):
                r.stage += 1
                r.stage_started = now
                r.baseline = self._telemetry_now()
            else:
                self._promote()

    def _trace_stage(self, r: Rollout, pct: int, verdict: str, reasons: list[str], now: float) -> None:
        """The stage as a span of the release's trace, from its start to its verdict, with one
        event per offered device: the install status it reported back."""
        with trace.span("rollout.stage", parent=trace.context_from_carrier(r.trace), start_time=r.stage_started,
                        counter=r.candidate, stage=r.stage, pct=pct, verdict=verdict,
                        reasons="; ".join(reasons)[:500] or None, offered=len(r.offered)) as sp:
            if sp is None:
                return
            snap = self.fleet.snapshot()
            for dev, offered in sorted(r.offered.items()):
                got = [x for x in (snap[dev].statuses if dev in snap else [])
                       if x.report.counter == r.candidate and x.received >= offered - 1]
                sp.add_event("device_install", {"device": dev, "status": got[-1].report.status if got else "silent"},
                             timestamp=int((got[-1].received if got else now) * 1e9))

    def _settings(self, r: Rollout | None) -> RolloutSettings:
        return r.settings if r is not None and r.settings is not None else self.s

    def _population(self) -> list[str]:
        """The devices a rollout draws its cohorts from: every device, or those with its tag."""
        r = self.rollout
        devices = list(self.fleet.snapshot())
        if r is not None and r.tag is not None:
            devices = [d for d in devices if r.tag in self.device_tags(d)]
        return devices

    def _offer_stage(self, r: Rollout, now: float) -> None:
        s = self._settings(r)
        pct = s.stages[r.stage]
        control = set(self._control())
        eligible = sorted((bucket(s.fleet, d), d) for d in self._population() if d not in control)
        share = [d for b, d in eligible if b < pct * (100 - s.control_pct) / 100]
        if len(share) < s.min_devices:
            share = [d for _, d in eligible[:s.min_devices]]
        _, manifest = self.registry.files(r.candidate)
        for dev in share:
            if dev in r.offered or not self._take_token(now):
                continue
            self._publish(manifest, keys.release_bundle(r.candidate), device=dev)
            r.offered[dev] = now

    def _promote(self) -> None:
        r = self.rollout
        assert r is not None
        _, manifest = self.registry.files(r.candidate)
        self._publish(manifest, keys.release_bundle(r.candidate), device=None)
        if r.stable is not None:
            self.registry.set_state(r.stable, "retired", reason=f"replaced by {r.candidate}")
        self.registry.set_state(r.candidate, "stable", reason="passed every stage")
        r.state, r.result = "promoted", "promoted"
        with trace.span("rollout.promoted", parent=trace.context_from_carrier(r.trace), counter=r.candidate):
            pass
        self._log("rollout_promoted")
        self.history.append(self.status())

    def _abort(self, reasons: list[str], actor: str) -> None:
        r = self.rollout
        assert r is not None
        rollback = self.registry.rollback_manifest(r.candidate)
        if rollback is not None and r.stable is not None:
            key = keys.release_bundle(r.stable)
            for dev in r.offered:
                self._publish(rollback, key, device=dev)
            self._publish(rollback, key, device=None)
        self.registry.set_state(r.candidate, "rolled_back", reason="; ".join(reasons)[:500], actor=actor)
        r.state, r.result, r.reasons = "aborted", "rolled_back", reasons
        with trace.span("rollout.aborted", parent=trace.context_from_carrier(r.trace), counter=r.candidate,
                        actor=actor, reasons="; ".join(reasons)[:500]):
            pass
        self._log("rollout_aborted", reasons=reasons, actor=actor, rollback_published=rollback is not None)
        self.history.append(self.status())

    # -- helpers ----------------------------------------------------------------------------

    def _control(self) -> list[str]:
        """The top ``control_pct`` of buckets, and never fewer than ``min_devices`` devices."""
        s = self._settings(self.rollout)
        ranked = sorted(((bucket(s.fleet, d), d) for d in self._population()), reverse=True)
        chosen = [d for b, d in ranked if b >= 100 - s.control_pct]
        return chosen if len(chosen) >= s.min_devices else [d for _, d in ranked[:s.min_devices]]

    def _telemetry_now(self) -> dict[str, Telemetry]:
        return {d: v.telemetry for d, v in self.fleet.snapshot().items() if v.telemetry is not None}

    def _take_token(self, now: float) -> bool:
        self._tokens = min(self.s.notify_rate, self._tokens + (now - self._last_refill) * self.s.notify_rate)
        self._last_refill = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _publish(self, manifest: bytes, bundle_key: str, *, device: str | None) -> None:
        self.notifications += 1
        if self.link is not None:
            if self._roots is None:   # not per offer: on S3 that would be a LIST and a GET per root each time
                self._roots = self.root_chain()
            publish_release(self.link, self.s.fleet, manifest, url=self.url_for(bundle_key), device=device,
                            root_chain=self._roots)

    def root_chain(self) -> list[bytes]:
        """The signed root versions after the first, oldest first, as the signing service put them
        in the store (``trust/roots/{version}.json``): a device that missed a key rotation walks
        them before it checks the release. Public, signed metadata; the device verifies each."""
        versions = sorted((v, k) for k in self.registry.store.list(keys.ROOTS_PREFIX)
                          if (v := keys.root_version(k)) is not None)
        return [self.registry.store.get(k) for _, k in versions]

    def _set(self, new: RolloutState, expect: RolloutState, actor: str) -> dict[str, Any]:
        with self._lock:
            if not self.rollout or self.rollout.state != expect:
                raise RolloutConflict(f"no {expect} rollout")
            self.rollout.state = new
            self._log(f"rollout_{new}", actor=actor)
            return self.status()

    def _log(self, name: str, **fields: object) -> None:
        r = self.rollout
        fields = {"candidate": r.candidate, "stable": r.stable, **fields} if r else fields
        self.registry.audit.record(name, **fields)
        event(log, name, level=logging.INFO, **fields)   # (level named: no field can take its place)


def _default_url(store: ObjectStore, key: str) -> str:
    if isinstance(store, FileStore):
        return (store.root / key).as_uri()
    return store.presign(key)  # type: ignore[attr-defined]
