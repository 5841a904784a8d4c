"""Staged rollout: canary cohorts, analysis against a control cohort, promotion or rollback.

Devices are placed deterministically by a hash of fleet and device id into a bucket in
[0, 100). Buckets at or above ``100 - control_pct`` (and never fewer than ``min_devices`` devices) form
the *control cohort*: they stay on the stable release for the whole rollout. Stage ``k`` (``stages``, e.g. 5 -> 25 -> 100 % of the other
devices) offers the candidate to the devices whose bucket falls below that share, and at
least ``min_devices`` of them. Offers are rate-limited (``notify_rate`` per second).

After ``stage_seconds`` a stage is analysed from what the devices reported since it began
(:func:`analyze`, a pure function of the observations):

- install failures (``rejected:*``, ``rolled_back:*`` statuses), and devices that did not
  report a status within ``report_timeout`` of their offer, which count as failures;
- error rate and NaN rate of the canary devices' decisions;
- decision latency p95, canary median against control median;
- reward per step, canary devices against control devices, with a one-sided Welch t-test
  on the reward per step of every telemetry interval since the stage began.

Missing metrics never count as success: a canary device without telemetry since its offer is
not healthy, and no stage passes until ``min_devices`` devices and ``min_decisions`` decisions
of each cohort have reported; a stage still short of data at ``stage_timeout`` aborts. An
abort publishes the pre-signed fleet rollback (a release with a higher counter naming the
stable bundle: the controller holds no signing key), marks the candidate rolled back and
writes the reason to the audit log. Passing the last stage promotes the candidate: it becomes
the fleet's retained release and the stable one in the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cogbert_cloud.data.store import FileStore, ObjectStore
from cogbert_cloud.errors import ConflictError
from cogbert_cloud.release.distribution import publish_release
from cogbert_cloud.release.registry import Registry
from cogbert_edge._internal.log import event
from cogbert_edge.link.mqtt import Message, MqttLink

__all__ = ["RolloutSettings", "FleetView", "RolloutController", "RolloutConflict", "analyze", "bucket", "welch_p_less"]

log = logging.getLogger("cogbert.rollout")


@dataclass
class RolloutSettings:
    fleet: str = "default"
    stages: tuple[int, ...] = (5, 25, 100)
    control_pct: int = 10
    stage_seconds: float = 60.0
    stage_timeout: float = 300.0
    report_timeout: float = 60.0
    min_devices: int = 2
    min_decisions: int = 200
    max_install_failure_rate: float = 0.2
    max_error_rate: float = 0.01
    max_nan_rate: float = 0.001
    latency_factor: float = 2.0
    latency_slack_us: float = 200.0
    reward_alpha: float = 0.05
    notify_rate: float = 20.0


def bucket(fleet: str, device: str) -> float:
    """The device's place in [0, 100): stable across runs and controllers."""
    return int(hashlib.sha256(f"{fleet}:{device}".encode()).hexdigest()[:8], 16) % 10000 / 100.0


# -- what devices report ------------------------------------------------------------------------


ROOTS_PREFIX = "trust/roots/"   # root metadata the devices may need, put there by the signing service
_REWARD_HISTORY = 1000      # telemetry reports kept per device for the reward test



class RolloutConflict(ConflictError):
    """A rollout cannot start or change state now (another is running, the release is not a
    candidate, there is no rollout to pause)."""

class FleetView:
    """Every device's latest telemetry and its status reports, from the MQTT topics."""

    def __init__(self) -> None:
        self.devices: dict[str, dict] = {}
        self._lock = threading.Lock()

    def on_telemetry(self, device: str, t: dict, now: float | None = None) -> None:
        with self._lock:
            d = self.devices.setdefault(device, {"statuses": []})
            d["telemetry"] = t
            d["last_seen"] = now if now is not None else time.time()
            if (isinstance(t.get("reward_sum"), (int, float)) and math.isfinite(t["reward_sum"])
                    and isinstance(t.get("reward_count"), int)):
                rewards = d.setdefault("rewards", [])
                rewards.append((d["last_seen"], float(t["reward_sum"]), t["reward_count"]))
                del rewards[:-_REWARD_HISTORY]

    def on_status(self, device: str, s: dict, now: float | None = None) -> None:
        with self._lock:
            d = self.devices.setdefault(device, {"statuses": []})
            d["statuses"].append({**s, "received": now if now is not None else time.time()})
            d["statuses"] = d["statuses"][-50:]
            d["last_seen"] = now if now is not None else time.time()

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return json.loads(json.dumps(self.devices))

    def attach(self, link: MqttLink, fleet: str) -> None:
        def handler(kind: str) -> Callable[[Message], None]:
            def on(m: Message) -> None:
                device = m.topic.split("/")[3]
                try:
                    payload = json.loads(m.payload)
                except ValueError:
                    return
                if not isinstance(payload, dict):
                    return
                (self.on_telemetry if kind == "telemetry" else self.on_status)(device, payload)
            return on
        link.subscribe(f"cogbert/v1/{fleet}/+/telemetry", handler("telemetry"), qos=0)
        link.subscribe(f"cogbert/v1/{fleet}/+/status", handler("status"))


# -- the decision, as a pure function ----------------------------------------------------------


def welch_p_less(a: list[float], b: list[float]) -> float:
    """One-sided p-value that mean(a) < mean(b) (Welch's t-test; 1.0 when it cannot be told)."""
    if len(a) < 2 or len(b) < 2:
        return 1.0
    ma, mb = float(np.mean(a)), float(np.mean(b))
    va, vb = float(np.var(a, ddof=1)) / len(a), float(np.var(b, ddof=1)) / len(b)
    if va + vb == 0:
        return 0.0 if ma < mb else 1.0
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2) / (len(a) - 1) + (vb ** 2) / (len(b) - 1))
    return _student_t_cdf(t, df)


def _student_t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2, 0.5, x)
    return tail if t < 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(200):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1.0 + num / (c if abs(c) > 1e-30 else 1e-30)
        f *= c * d
        if abs(1.0 - c * d) < 1e-12:
            break
    return front * (f - 1.0) / a


def _interval_rates(device: dict, since: float) -> list[float]:
    """Reward per step over each interval between consecutive telemetry reports since ``since``."""
    h = [x for x in device.get("rewards", ()) if x[0] >= since]
    return [(b[1] - a[1]) / (b[2] - a[2]) for a, b in zip(h, h[1:]) if b[2] > a[2]]


@dataclass
class StageResult:
    verdict: str                     # "pass", "wait" or "abort"
    reasons: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def analyze(s: RolloutSettings, *, canary: dict[str, float], control: list[str], devices: dict[str, dict],
            baseline: dict[str, dict], candidate_counter: int, stage_started: float, now: float) -> StageResult:
    """Decide one stage from what devices reported. ``canary`` maps each offered device to
    when it was offered; ``baseline`` holds each device's telemetry at the stage's start
    (counters are cumulative: the stage's share is the difference)."""
    installed, failed, timed_out = [], [], []
    for dev, offered in canary.items():
        statuses = [st for st in devices.get(dev, {}).get("statuses", [])
                    if st.get("counter") == candidate_counter and st.get("received", 0) >= offered - 1]
        bad = [st["status"] for st in statuses if st["status"].startswith(("rejected:", "rolled_back:"))]
        if bad:
            failed.append(f"{dev}:{bad[-1]}")
        elif any(st["status"] in ("trial", "committed", "already_installed") for st in statuses):
            installed.append(dev)
        elif now - offered > s.report_timeout:
            timed_out.append(dev)

    def window(dev: str) -> dict | None:
        t = devices.get(dev, {}).get("telemetry")
        b = baseline.get(dev)
        if t is None or devices[dev].get("last_seen", 0) < stage_started:
            return None                  # nothing reported during this stage: unknown, not healthy
        b = b or {"decisions": 0, "errors": 0, "nonfinite": 0, "reward_sum": 0.0, "reward_count": 0}
        n = t.get("decisions", 0) - b.get("decisions", 0)
        return {"decisions": n, "errors": t.get("errors", 0) - b.get("errors", 0),
                "nonfinite": t.get("nonfinite", 0) - b.get("nonfinite", 0),
                "reward": t.get("reward_sum", 0.0) - b.get("reward_sum", 0.0),
                "reward_n": t.get("reward_count", 0) - b.get("reward_count", 0),
                "latency_p95_us": t.get("latency_p95_us")}

    can = {d: w for d in installed if (w := window(d)) is not None and w["decisions"] > 0}
    ctl = {d: w for d in control if (w := window(d)) is not None and w["decisions"] > 0}
    n_can = sum(w["decisions"] for w in can.values())
    n_ctl = sum(w["decisions"] for w in ctl.values())
    offered = max(len(canary), 1)
    m = {"offered": len(canary), "installed": len(installed), "install_failures": failed, "timed_out": timed_out,
         "canary_reporting": len(can), "control_reporting": len(ctl), "canary_decisions": n_can,
         "control_decisions": n_ctl}
    reasons = []
    if (len(failed) + len(timed_out)) / offered > s.max_install_failure_rate:
        why = "install_failures" if failed else "timeout"
        reasons.append(f"{why}: {len(failed)} failed and {len(timed_out)} silent of {len(canary)} offered")
    if n_can:
        err = sum(w["errors"] for w in can.values()) / n_can
        nan = sum(w["nonfinite"] for w in can.values()) / n_can
        m.update(error_rate=err, nan_rate=nan)
        if err > s.max_error_rate:
            reasons.append(f"error_rate: {err:.2%} > {s.max_error_rate:.2%}")
        if nan > s.max_nan_rate:
            reasons.append(f"nan_rate: {nan:.2%} > {s.max_nan_rate:.2%}")
    lat_c = [w["latency_p95_us"] for w in can.values() if w["latency_p95_us"] is not None]
    lat_k = [w["latency_p95_us"] for w in ctl.values() if w["latency_p95_us"] is not None]
    if lat_c and lat_k:
        mc, mk = float(np.median(lat_c)), float(np.median(lat_k))
        m.update(latency_p95_us_canary=mc, latency_p95_us_control=mk)
        if mc > mk * s.latency_factor + s.latency_slack_us:
            reasons.append(f"latency: canary p95 {mc:.0f} µs vs control {mk:.0f} µs")
    rc = [w["reward"] / w["reward_n"] for w in can.values() if w["reward_n"] > 0]
    rk = [w["reward"] / w["reward_n"] for w in ctl.values() if w["reward_n"] > 0]
    if rc and rk:
        # The test's samples are the reward per step of each telemetry interval of each device:
        # with two control devices, per-device means leave Welch ~2 degrees of freedom and missed
        # a policy that had collapsed to no-ops. Intervals of one device are not independent
        # when devices differ, which makes the test quicker to abort, not to promote.
        wc = [r for d in can for r in _interval_rates(devices[d], stage_started)]
        wk = [r for d in ctl for r in _interval_rates(devices[d], stage_started)]
        p = welch_p_less(wc, wk) if len(wc) >= 2 and len(wk) >= 2 else welch_p_less(rc, rk)
        m.update(reward_per_step_canary=float(np.mean(rc)), reward_per_step_control=float(np.mean(rk)), reward_p=p,
                 reward_intervals_canary=len(wc), reward_intervals_control=len(wk))
        if p < s.reward_alpha:
            reasons.append(f"reward: canary {np.mean(rc):.3f}/step < control {np.mean(rk):.3f}/step (p={p:.3f})")
    if reasons:
        return StageResult("abort", reasons, m)
    enough = (len(can) >= s.min_devices and len(ctl) >= s.min_devices and n_can >= s.min_decisions
              and n_ctl >= s.min_decisions and len(installed) == len(canary))
    if not enough:
        if now - stage_started > s.stage_timeout:
            return StageResult("abort", [f"insufficient_data: {m}"], m)
        return StageResult("wait", [], m)
    return StageResult("pass", [], m)


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
        self.rollout: dict | None = None
        self.history: list[dict] = []
        self._lock = threading.Lock()
        self._tokens = settings.notify_rate
        self._last_refill = clock()
        self.notifications = 0

    # -- operator actions -----------------------------------------------------------------

    def start(self, candidate: int, *, actor: str = "system") -> dict:
        with self._lock:
            if self.rollout and self.rollout["state"] in ("running", "paused"):
                raise RolloutConflict(f"rollout of release {self.rollout['candidate']} is {self.rollout['state']}")
            rec = self.registry.get(candidate)
            if rec["state"] != "candidate":
                raise RolloutConflict(f"release {candidate} is {rec['state']}, not a candidate")
            stable = self.registry.stable()
            now = self.clock()
            self._roots = None        # a rotation since the last rollout shows up in this one
            self.rollout = {"candidate": candidate, "stable": stable["counter"] if stable else None,
                            "state": "running", "stage": 0, "started": now, "stage_started": now,
                            "offered": {}, "baseline": self._telemetry_now(), "timeline": [], "result": None}
            self.registry.set_state(candidate, "canary", actor=actor)
            self._log("rollout_started", actor=actor)
            return self.status()

    def pause(self, *, actor: str = "operator") -> dict:
        return self._set("paused", "running", actor)

    def resume(self, *, actor: str = "operator") -> dict:
        with self._lock:
            if self.rollout and self.rollout["state"] == "paused":
                self.rollout["stage_started"] = self.clock()
                self.rollout["baseline"] = self._telemetry_now()
        return self._set("running", "paused", actor)

    def abort(self, reason: str = "operator", *, actor: str = "operator") -> dict:
        with self._lock:
            if not self.rollout or self.rollout["state"] not in ("running", "paused"):
                raise RolloutConflict("no rollout in progress")
            self._abort([reason], actor)
            return self.status()

    def status(self) -> dict:
        r = self.rollout
        return {} if r is None else {k: v for k, v in r.items() if k != "baseline"}

    # -- the loop -------------------------------------------------------------------------

    def tick(self) -> None:
        with self._lock:
            r = self.rollout
            if r is None or r["state"] != "running":
                return
            now = self.clock()
            self._offer_stage(now)
            if now - r["stage_started"] < self.s.stage_seconds:
                return
            res = analyze(self.s, canary=r["offered"], control=self._control(), devices=self.fleet.snapshot(),
                          baseline=r["baseline"], candidate_counter=r["candidate"],
                          stage_started=r["stage_started"], now=now)
            if res.verdict == "wait":
                return
            r["timeline"].append({"time": now, "stage": r["stage"], "pct": self.s.stages[r["stage"]],
                                  "verdict": res.verdict, "reasons": res.reasons, "metrics": res.metrics})
            self._log("stage_analysed", stage=r["stage"], verdict=res.verdict, reasons=res.reasons,
                      metrics=res.metrics)
            if res.verdict == "abort":
                self._abort(res.reasons, "controller")
            elif r["stage"] + 1 < len(self.s.stages):
                r["stage"] += 1
                r["stage_started"] = now
                r["baseline"] = self._telemetry_now()
            else:
                self._promote()

    def _offer_stage(self, now: float) -> None:
        r = self.rollout
        pct = self.s.stages[r["stage"]]
        eligible = sorted((bucket(self.s.fleet, d), d) for d in self.fleet.snapshot() if d not in self._control())
        share = [d for b, d in eligible if b < pct * (100 - self.s.control_pct) / 100]
        if len(share) < self.s.min_devices:
            share = [d for _, d in eligible[:self.s.min_devices]]
        _, manifest = self.registry.files(r["candidate"])
        for dev in share:
            if dev in r["offered"] or not self._take_token(now):
                continue
            self._publish(manifest, f"releases/{r['candidate']}/model.safetensors", device=dev)
            r["offered"][dev] = now

    def _promote(self) -> None:
        r = self.rollout
        bundle_key = f"releases/{r['candidate']}/model.safetensors"
        _, manifest = self.registry.files(r["candidate"])
        self._publish(manifest, bundle_key, device=None)
        if r["stable"] is not None:
            self.registry.set_state(r["stable"], "retired", reason=f"replaced by {r['candidate']}")
        self.registry.set_state(r["candidate"], "stable", reason="passed every stage")
        r["state"], r["result"] = "promoted", "promoted"
        self._log("rollout_promoted")
        self.history.append(self.status())

    def _abort(self, reasons: list[str], actor: str) -> None:
        r = self.rollout
        rollback = self.registry.rollback_manifest(r["candidate"])
        if rollback is not None and r["stable"] is not None:
            key = f"releases/{r['stable']}/model.safetensors"
            for dev in r["offered"]:
                self._publish(rollback, key, device=dev)
            self._publish(rollback, key, device=None)
        self.registry.set_state(r["candidate"], "rolled_back", reason="; ".join(reasons)[:500], actor=actor)
        r["state"], r["result"], r["reasons"] = "aborted", "rolled_back", reasons
        self._log("rollout_aborted", reasons=reasons, actor=actor, rollback_published=rollback is not None)
        self.history.append(self.status())

    # -- helpers ----------------------------------------------------------------------------

    def _control(self) -> list[str]:
        """The top ``control_pct`` of buckets, and never fewer than ``min_devices`` devices."""
        ranked = sorted(((bucket(self.s.fleet, d), d) for d in self.fleet.snapshot()), reverse=True)
        chosen = [d for b, d in ranked if b >= 100 - self.s.control_pct]
        return chosen if len(chosen) >= self.s.min_devices else [d for _, d in ranked[:self.s.min_devices]]

    def _telemetry_now(self) -> dict[str, dict]:
        return {d: v.get("telemetry", {}) for d, v in self.fleet.snapshot().items()}

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
        keys = self.registry.store.list(ROOTS_PREFIX)
        versions = sorted((int(k.rsplit("/", 1)[1].split(".")[0]), k) for k in keys
                          if k.rsplit("/", 1)[1].split(".")[0].isdigit())
        return [self.registry.store.get(k) for _, k in versions]

    def _set(self, new: str, expect: str, actor: str) -> dict:
        with self._lock:
            if not self.rollout or self.rollout["state"] != expect:
                raise RolloutConflict(f"no {expect} rollout")
            self.rollout["state"] = new
            self._log(f"rollout_{new}", actor=actor)
            return self.status()

    def _log(self, name: str, **fields: object) -> None:
        r = self.rollout
        fields = {"candidate": r["candidate"], "stable": r["stable"], **fields} if r else fields
        self.registry.audit.record(name, **fields)
        event(log, name, **fields)


def _default_url(store: ObjectStore, key: str) -> str:
    if isinstance(store, FileStore):
        return (store.root / key).as_uri()
    return store.presign(key)  # type: ignore[attr-defined]
