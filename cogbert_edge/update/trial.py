"""A new model's trial on the device, and the golden-output check that precedes it.

Before a swap, the device recomputes the bundle's ``x-golden`` outputs (greedy actions and
values on seeded inputs, stored by the exporter) on its own backend. After the swap, the
:class:`Trial` watches ``trial_decisions`` decisions over at least ``trial_seconds``: any
non-finite output, an error rate above ``max_error_rate``, or a decision latency above
``latency_factor`` times the previous model's plus ``latency_slack_us`` ends it in a rollback.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np

from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.policy import Policy
from cogbert_edge.update.state import InstalledModel
from cogbert_edge.update.trust import Release

__all__ = ["Trial", "TrialLimits", "golden_outputs", "golden_check"]

_MAX_LATENCIES = 10_000


@dataclass(frozen=True)
class TrialLimits:
    decisions: int = 200
    seconds: float = 5.0
    latency_factor: float = 3.0
    latency_slack_us: float = 500.0
    max_error_rate: float = 0.01


@dataclass
class Trial:
    release: Release
    policy: Policy
    bundle: Bundle
    previous: InstalledModel | None
    started: float = field(default_factory=time.monotonic)
    decisions: int = 0
    errors: int = 0
    nonfinite: int = 0
    latencies_s: list[float] = field(default_factory=list)

    def observe(self, latency_s: float, ok: bool, finite: bool, limits: TrialLimits,
                baseline_latency_us: np.ndarray | None) -> str | None:
        """Count one decision. Returns ``"pass"`` when the trial is over and the model is good,
        a failure reason when it must roll back, or None while it goes on."""
        self.decisions += 1
        self.errors += not ok
        self.nonfinite += not finite
        if len(self.latencies_s) < _MAX_LATENCIES:
            self.latencies_s.append(latency_s)
        if self.nonfinite:
            return "nan_outputs"
        if self.decisions < limits.decisions or time.monotonic() - self.started < limits.seconds:
            return None
        if self.errors > limits.max_error_rate * self.decisions:
            return "error_rate"
        # The same quantile of both models: p95 once the trial has 100 decisions, else the median.
        # The p95 of a short trial is its maximum, and one scheduler stall (another thread holding
        # the GIL, a busy core) would roll back a model that is not slower.
        if baseline_latency_us is not None and len(baseline_latency_us):
            q = 95 if len(self.latencies_s) >= 100 else 50
            base = float(np.percentile(baseline_latency_us, q))
            now = float(np.percentile(self.latencies_s, q) * 1e6)
            if now > base * limits.latency_factor + limits.latency_slack_us:
                return f"latency:p{q}_{now:.0f}us_vs_{base:.0f}us"
        return "pass"


def golden_outputs(bundle: Bundle, seed: int = 7, steps: int = 16) -> dict:
    """Greedy actions and values of ``bundle`` on seeded inputs, with the numpy reference.
    The exporter stores them as the bundle's ``x-golden``; a device recomputes them on its own
    backend before trusting a new model."""
    policy = Policy(bundle, "numpy")
    obs = np.random.default_rng(seed).standard_normal((steps, bundle.config.obs_dim)).astype(np.float32)
    state, actions, values = policy.initial_state(), [], []
    for x in obs:
        d = policy.act(x, state, deterministic=True)
        state = d.state
        actions.append(d.action if isinstance(d.action, int) else [round(float(v), 6) for v in d.action])
        values.append(round(d.value, 6))
    return {"seed": seed, "steps": steps, "actions": actions, "values": values}


def golden_check(bundle: Bundle, policy: Policy, agreement: float) -> str | None:
    """None when ``policy`` reproduces the bundle's golden outputs, else what differs."""
    raw = bundle.extra.get("x-golden")
    if raw is None:
        return None
    try:
        g = json.loads(raw)
        obs = np.random.default_rng(int(g["seed"])).standard_normal((int(g["steps"]), bundle.config.obs_dim))
        actions, values = list(g["actions"]), list(g["values"])
    except (ValueError, KeyError, TypeError):
        return "x-golden is malformed"
    if len(actions) != len(obs) or len(values) != len(obs):
        return "x-golden is malformed"
    state, agree, worst = policy.initial_state(), 0, 0.0
    for x, a, v in zip(obs.astype(np.float32), actions, values, strict=True):
        d = policy.act(x, state, deterministic=True)
        state = d.state
        if not np.isfinite(d.value):
            return "non-finite value on golden inputs"
        agree += (d.action == a) if isinstance(a, int) else bool(np.allclose(d.action, a, atol=0.05))
        worst = max(worst, abs(d.value - v) / (1.0 + abs(v)))
    if agree < agreement * len(actions) or worst > 0.05:
        return f"golden outputs differ ({agree}/{len(actions)} actions agree, value error {worst:.3f})"
    return None
