"""One stage's verdict, as a pure function of what the devices reported (:func:`analyze`).

- install failures (``rejected:*``, ``rolled_back:*`` statuses), and devices that did not
  report a status within ``report_timeout`` of their offer, which count as failures;
- error rate and NaN rate of the canary devices' decisions;
- decision latency p95, canary median against control median;
- reward per step, canary devices against control devices, with a one-sided Welch t-test
  on the reward per step of every telemetry interval since the stage began.

Missing metrics never count as success: a canary device without telemetry since its offer is
not healthy, and no stage passes until ``min_devices`` devices and ``min_decisions`` decisions
of each cohort have reported; a stage still short of data at ``stage_timeout`` aborts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cogbert_cloud.release.rollout.fleet import DeviceRecord
from cogbert_cloud.release.rollout.settings import RolloutSettings
from cogbert_cloud.release.rollout.stats import welch_p_less
from cogbert_edge.wire.messages import Telemetry

__all__ = ["analyze", "StageResult", "StageWindow"]

Verdict = Literal["pass", "wait", "abort"]


@dataclass
class StageResult:
    verdict: Verdict
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageWindow:
    """One device's share of a stage: its cumulative counters minus those at the stage's start."""

    decisions: int
    errors: int
    nonfinite: int
    reward: float
    reward_n: int
    latency_p95_us: float | None

    @classmethod
    def between(cls, start: Telemetry | None, now: Telemetry) -> StageWindow:
        if start is None:
            return cls(now.decisions, now.errors, now.nonfinite, now.reward_sum, now.reward_count, now.latency_p95_us)
        return cls(now.decisions - start.decisions, now.errors - start.errors, now.nonfinite - start.nonfinite,
                   now.reward_sum - start.reward_sum, now.reward_count - start.reward_count, now.latency_p95_us)


def _interval_rates(device: DeviceRecord, since: float) -> list[float]:
    """Reward per step over each interval between consecutive telemetry reports since ``since``."""
    h = [x for x in device.rewards if x[0] >= since]
    return [(b[1] - a[1]) / (b[2] - a[2]) for a, b in zip(h, h[1:], strict=False) if b[2] > a[2]]


def analyze(s: RolloutSettings, *, canary: Mapping[str, float], control: list[str],
            devices: Mapping[str, DeviceRecord], baseline: Mapping[str, Telemetry], candidate_counter: int,
            stage_started: float, now: float) -> StageResult:
    """Decide one stage from what devices reported. ``canary`` maps each offered device to
    when it was offered; ``baseline`` holds each device's telemetry at the stage's start
    (counters are cumulative: the stage's share is the difference)."""
    installed, failed, timed_out = [], [], []
    empty = DeviceRecord()
    for dev, offered in canary.items():
        statuses = [st.report for st in devices.get(dev, empty).statuses
                    if st.report.counter == candidate_counter and st.received >= offered - 1]
        bad = [st.status for st in statuses if st.failed]
        if bad:
            failed.append(f"{dev}:{bad[-1]}")
        elif any(st.installed for st in statuses):
            installed.append(dev)
        elif now - offered > s.report_timeout:
            timed_out.append(dev)

    def window(dev: str) -> StageWindow | None:
        d = devices.get(dev)
        if d is None or d.telemetry is None or d.last_seen < stage_started:
            return None                  # nothing reported during this stage: unknown, not healthy
        return StageWindow.between(baseline.get(dev), d.telemetry)

    can = {d: w for d in installed if (w := window(d)) is not None and w.decisions > 0}
    ctl = {d: w for d in control if (w := window(d)) is not None and w.decisions > 0}
    n_can = sum(w.decisions for w in can.values())
    n_ctl = sum(w.decisions for w in ctl.values())
    offered = max(len(canary), 1)
    m: dict[str, Any] = {"offered": len(canary), "installed": len(installed), "install_failures": failed,
                         "timed_out": timed_out, "canary_reporting": len(can), "control_reporting": len(ctl),
                         "canary_decisions": n_can, "control_decisions": n_ctl}
    reasons = []
    if (len(failed) + len(timed_out)) / offered > s.max_install_failure_rate:
        why = "install_failures" if failed else "timeout"
        reasons.append(f"{why}: {len(failed)} failed and {len(timed_out)} silent of {len(canary)} offered")
    if n_can:
        err = sum(w.errors for w in can.values()) / n_can
        nan = sum(w.nonfinite for w in can.values()) / n_can
        m.update(error_rate=err, nan_rate=nan)
        if err > s.max_error_rate:
            reasons.append(f"error_rate: {err:.2%} > {s.max_error_rate:.2%}")
        if nan > s.max_nan_rate:
            reasons.append(f"nan_rate: {nan:.2%} > {s.max_nan_rate:.2%}")
    lat_c = [w.latency_p95_us for w in can.values() if w.latency_p95_us is not None]
    lat_k = [w.latency_p95_us for w in ctl.values() if w.latency_p95_us is not None]
    if lat_c and lat_k:
        mc, mk = float(np.median(lat_c)), float(np.median(lat_k))
        m.update(latency_p95_us_canary=mc, latency_p95_us_control=mk)
        if mc > mk * s.latency_factor + s.latency_slack_us:
            reasons.append(f"latency: canary p95 {mc:.0f} µs vs control {mk:.0f} µs")
    rc = [w.reward / w.reward_n for w in can.values() if w.reward_n > 0]
    rk = [w.reward / w.reward_n for w in ctl.values() if w.reward_n > 0]
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
