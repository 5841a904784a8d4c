"""The promotion gate: may a candidate policy replace the baseline?

    cogbert cloud evaluate --candidate new.safetensors --baseline live.safetensors \\
        --data file:///var/lib/cogbert --env ProductionChain-v0 --json

prints ``{"decision": "promote"|"reject", "estimates": {...}, "ci": {...}, "reasons": [...], ...}``.
The rule (``docs/ope.md``): promote only when

1. there are at least ``min_episodes`` complete logged episodes, at most ``max_deterministic``
   of the logged decisions were deterministic, and the candidate's effective sample size under
   the chosen estimator is at least ``min_ess``;
2. the lower end of the paired bootstrap CI (``level``) of candidate - baseline, both estimated
   off-policy with ``estimator`` on the same episodes, exceeds
   ``margin + relative_margin * |baseline estimate|``. The estimand is the discounted return
   from each episode's start, or with ``horizon`` H > 0 the discounted return over H steps
   from states the behaviour reached (windows; ``docs/ope.md``);
3. when an environment is given, the simulator shows no regression: over ``sim_episodes``
   seeded episodes, the same for both policies (paired), the candidate's mean undiscounted
   return is at least the baseline's minus ``sim_tolerance + sim_se * (standard error of the
   paired difference)``.

Every failed condition adds a reason; missing data is a reject, never an error. The baseline
goes through the same estimator as the candidate: when the baseline logged the data its
weights are 1 and its estimate is the on-policy mean; when several models logged, it is
corrected like any target.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from cogbert_cloud.learn.ope import (
    ESTIMATORS,
    Episodes,
    OPEError,
    compare,
    episodes_from_store,
    target_terms,
    windowed,
)
from cogbert_edge import Bundle, load_bundle
from cogbert_edge.errors import ConfigError

__all__ = ["GateSettings", "evaluate_candidate", "register"]


@dataclass
class GateSettings:
    estimator: str = field(default="dr", metadata={"help": "wis, pdwis or dr"})
    # Windows by default: over whole 256-step episodes the ratio products leave a retrained
    # candidate a handful of effective episodes (docs/ope.md, "Windows").
    gamma: float = field(default=0.95, metadata={"help": "discount of the estimated return"})
    horizon: int = field(default=32, metadata={"help": "H: the return over H steps from every --stride-th "
                                               "logged step; 0: the return from each episode's start"})
    stride: int = field(default=8, metadata={"help": "steps between window starts (with --horizon)"})
    margin: float = field(default=0.0,
                          metadata={"help": "the difference's lower bound must exceed this (return units)"})
    relative_margin: float = field(default=0.0, metadata={"help": "... plus this fraction of |baseline estimate|"})
    level: float = field(default=0.95, metadata={"help": "confidence level of the bootstrap intervals"})
    resamples: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    min_episodes: int = field(default=50, metadata={"help": "fewer complete logged episodes: reject"})
    min_ess: float = field(default=25.0, metadata={"help": "smaller candidate effective sample size: reject"})
    max_deterministic: float = field(default=0.05,
                                     metadata={"help": "larger share of deterministic logged decisions: reject"})
    calibrate_value: bool = field(default=True, metadata={"help": "fit DR's value scale on the data"})
    sim_episodes: int = field(default=200, metadata={"help": "paired simulator episodes (with an environment)"})
    sim_tolerance: float = field(default=0.0, metadata={"help": "allowed simulated regression (return units)"})
    sim_se: float = field(default=2.0, metadata={"help": "... plus this many standard errors of the paired difference"})
    seed: int = field(default=0, metadata={"help": "seeds the bootstrap and the simulator"})
    fleet: str | None = field(default=None, metadata={"help": "only this fleet's experience"})

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"level must be in (0, 1), got {self.level}")
        if self.horizon < 0:
            raise ConfigError(f"horizon must be >= 0, got {self.horizon}")
        for name in ("resamples", "min_episodes", "sim_episodes", "stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        for name in ("relative_margin", "min_ess", "max_deterministic", "sim_tolerance", "sim_se"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a finite number >= 0")


def evaluate_candidate(candidate: Bundle, baseline: Bundle, episodes: Episodes | str | None = None,
                       env: str | None = None, *, data_url: str | None = None,
                       settings: GateSettings | None = None, env_kwargs: dict | None = None,
                       **overrides: Any) -> dict:
    """The gate's decision with its evidence.

    The logged data are ``episodes`` (an :class:`Episodes`, or a store URL) or ``data_url``;
    ``env`` names the simulator of the regression check (none: no check). ``overrides`` are
    :class:`GateSettings` fields (``margin=``, ``min_episodes=``, ``level=``, ...) applied on
    top of ``settings`` (the defaults when None).
    """
    s = settings or GateSettings()
    if overrides:
        unknown = set(overrides) - {f.name for f in fields(GateSettings)}
        if unknown:
            raise ConfigError(f"unknown gate settings {sorted(unknown)}")
        s = replace(s, **overrides)
    data = episodes if episodes is not None else data_url
    reasons: list[str] = []
    out: dict = {"decision": "reject", "estimates": {}, "ci": {}, "reasons": reasons,
                 "estimator": s.estimator, "gamma": s.gamma, "level": s.level, "n_episodes": 0, "settings": asdict(s)}
    eps = _load(data, s, reasons, out)
    if eps is not None:
        out["n_episodes"], out["n_steps"] = eps.n, eps.steps
        out["deterministic_fraction"] = det = eps.deterministic_fraction()
        if eps.n < s.min_episodes:
            reasons.append(f"too little data: {eps.n} complete episodes, the gate needs {s.min_episodes}")
        if det > s.max_deterministic:
            reasons.append(f"{det:.1%} of logged decisions were deterministic (max {s.max_deterministic:.0%}): "
                           "the data cannot tell what other actions would have done")
        if eps.n >= 2:
            _off_policy(candidate, baseline, eps, s, out)
    if env is not None:
        out["sim"] = sim = simulate(candidate, baseline, env, s, env_kwargs)
        if not sim["ok"]:
            reasons.append(f"simulator regression in {env}: candidate {sim['candidate']:.2f} vs baseline "
                           f"{sim['baseline']:.2f} (difference {sim['difference']:.2f}, allowed -{sim['allowed']:.2f})")
    out["decision"] = "reject" if reasons else "promote"
    return out


def _load(data: Episodes | str | None, s: GateSettings, reasons: list[str], out: dict) -> Episodes | None:
    if data is None:
        reasons.append("no logged data given (--data): off-policy evaluation is impossible")
        return None
    if isinstance(data, Episodes):
        return data
    try:
        eps, out["data_report"] = episodes_from_store(data, s.fleet)
    except OPEError as e:
        reasons.append(f"no usable logged data at {data}: {e}")
        return None
    return eps


def _off_policy(candidate: Bundle, baseline: Bundle, eps: Episodes, s: GateSettings, out: dict) -> None:
    reasons = out["reasons"]
    try:
        terms = [target_terms(b, eps) for b in (candidate, baseline)]
        if s.horizon:
            terms = [windowed(t, s.horizon, s.stride) for t in terms]
    except OPEError as e:
        reasons.append(f"the logged data do not fit the policies: {e}")
        return
    r = compare(terms[0], terms[1], s.gamma, level=s.level, resamples=s.resamples, seed=s.seed,
                calibrate=s.calibrate_value)
    out["estimates"], out["ci"], out["ess"] = r["estimates"], r["ci"], r["ess"]
    k = s.estimator
    ess = r["ess"]["candidate"][k]
    if ess < s.min_ess:
        reasons.append(f"effective sample size of the candidate's weights is {ess:.1f} (< {s.min_ess:g}): "
                       "it is too far from the policy that logged the data")
    base = r["estimates"]["baseline"][k]
    out["threshold"] = threshold = s.margin + s.relative_margin * abs(base)
    lo, hi = r["ci"]["difference"][k]
    if not lo > threshold:   # also catches NaN from degenerate resamples
        reasons.append(f"the {s.level:.0%} lower bound of candidate - baseline ({k}) is {lo:.3f}, "
                       f"not above the margin {threshold:.3f} (estimate {r['estimates']['difference'][k]:.3f}, "
                       f"CI [{lo:.3f}, {hi:.3f}])")


def simulate(candidate: Bundle, baseline: Bundle, env: str, s: GateSettings,
             env_kwargs: dict | None = None) -> dict:
    """Paired simulator check: both policies on the same seeded episodes, sampling actions (as
    they run on devices and as the off-policy estimates assume)."""
    from cogbert_cloud.learn.train.ppo import evaluate
    kw: dict[str, Any] = dict(seed=s.seed + 1_000_003, deterministic=False, env_kwargs=env_kwargs)
    c = np.asarray(evaluate(candidate, env, s.sim_episodes, **kw))
    b = np.asarray(evaluate(baseline, env, s.sim_episodes, **kw))
    diff = c - b
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    allowed = s.sim_tolerance + s.sim_se * se
    return {"candidate": float(c.mean()), "baseline": float(b.mean()), "difference": float(diff.mean()),
            "difference_se": se, "allowed": allowed, "episodes": len(c), "ok": bool(diff.mean() >= -allowed)}


# -- command line ------------------------------------------------------------------------------


def register(csub: argparse._SubParsersAction) -> None:
    from cogbert_edge.config import add_arguments
    p = csub.add_parser("evaluate", help="off-policy evaluation and the promotion gate")
    p.add_argument("--candidate", required=True, help="candidate bundle file")
    p.add_argument("--baseline", required=True, help="baseline bundle file")
    p.add_argument("--data", default=None, help="experience store URL (file://DIR or s3://...)")
    p.add_argument("--env", default=None, help="simulator id for the regression check")
    p.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    add_arguments(p, GateSettings, env_prefix="GATE_")
    p.set_defaults(func=_main)


def _main(a: argparse.Namespace) -> int:
    from cogbert_edge.config import from_args
    s = from_args(GateSettings, a, env_prefix="GATE_")
    result = evaluate_candidate(load_bundle(a.candidate), load_bundle(a.baseline), a.data, a.env, settings=s)
    if a.json:
        print(json.dumps(_jsonable(result)))
    else:
        print(f"decision: {result['decision']}")
        for name, est in result["estimates"].items():
            ci = result["ci"][name][s.estimator]
            print(f"{name:>11}: {est[s.estimator]:10.3f}  CI [{ci[0]:.3f}, {ci[1]:.3f}]  ({s.estimator})")
        for reason in result["reasons"]:
            print(f"  - {reason}")
    return 0


def _jsonable(o: object) -> object:
    """Plain JSON: numpy scalars as numbers, NaN and infinities (degenerate weights) as null."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (np.generic, float)):
        v = o.item() if isinstance(o, np.generic) else o
        return v if not isinstance(v, float) or math.isfinite(v) else None
    return o
