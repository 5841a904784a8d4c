"""Off-policy evaluation: what a target policy would earn, estimated from episodes another
(behaviour) policy logged. ``docs/ope.md`` has the derivations, assumptions and measurements.

For episode i with steps t = 0..T_i-1 and per-decision ratios ρ_it = π_e(a_it|h_it) / π_b(a_it|h_it)
(π_b is the logged behaviour log-probability, π_e the target's recomputed one), let
ρ_i,0:t = Π_{k<=t} ρ_ik and the self-normalized weights w_it = n ρ_i,0:t / Σ_j ρ_j,0:t
(steps past an episode's end carry its last weight and reward 0). The estimand is the expected
discounted return per episode from its first step, J = E[Σ_t γ^t r_t] (γ = 1: undiscounted):

* **WIS** (trajectory-level, self-normalized): Σ_i ρ_i,0:T G_i / Σ_i ρ_i,0:T with G_i = Σ_t γ^t r_it.
* **PDWIS** (per-decision WIS): (1/n) Σ_i Σ_t γ^t w_it r_it.
* **DR** (weighted doubly robust, value-only form):
  (1/n) Σ_i [ V(h_i0) + Σ_t γ^t w_it (r_it + γ V(h_i,t+1) - V(h_it)) ], V := 0 after the last step.

V is the target's value head along the episode, affinely calibrated by least squares on the
logged data, V = a + b·v̂(h_t) + c·t/T_max (``calibrate=True``): a learned value head is often in
other units (normalized rewards, another γ) and knows nothing of a fixed horizon. A function of
the history up to t keeps DR a valid control variate; fitting three numbers on the same data
costs O(1/n) bias. On-policy data (all ρ = 1) makes all three estimators the sample mean exactly.

The target is replayed over each episode's observations from the zero recurrent state at the
episode's first step: the logged h0/c0 are the *behaviour* model's state, meaningless for another
model, so only episodes whose start was logged are used. A deterministic decision logs
log-probability 0 (probability 1): its ratio is π_e(a|h), and actions the target prefers there
were never tried, so such data cannot support the target (``deterministic_fraction`` reports it).
Confidence intervals are percentile bootstraps over episodes; :func:`compare` resamples the same
episodes for both policies, giving a paired interval for the difference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cogbert_cloud.errors import OPEError
from cogbert_cloud.learn.envs import make_vec_env
from cogbert_edge import Bundle, Policy
from cogbert_edge.inference.bounds import ActionBounds
from cogbert_edge.inference.model import NumpyMath, log_prob, sequence

__all__ = ["Episodes", "Terms", "OPEError", "ESTIMATORS", "collect_episodes", "episodes_from_store",
           "episodes_from_sequences", "target_terms", "windowed", "estimate", "ess", "bootstrap_counts",
           "evaluate_target", "compare", "percentile_ci"]

ESTIMATORS = ("wis", "pdwis", "dr")




@dataclass
class Episodes:
    """Complete logged episodes, padded to the longest: ``obs [N, T, D]``, the rest ``[N, T]``
    (continuous actions ``[N, T, A]``); ``mask`` marks the real steps."""

    obs: np.ndarray
    action: np.ndarray
    log_prob: np.ndarray
    reward: np.ndarray
    mask: np.ndarray

    @classmethod
    def from_lists(cls, obs: list, action: list, log_prob: list, reward: list) -> Episodes:
        if not obs:
            raise OPEError("no complete episodes")
        n, t_max = len(obs), max(len(o) for o in obs)

        def pad(parts: list, dtype: type) -> np.ndarray:
            first = np.asarray(parts[0])
            out: np.ndarray = np.zeros((n, t_max) + first.shape[1:], dtype)
            for i, p in enumerate(parts):
                out[i, :len(p)] = p
            return out

        mask = np.zeros((n, t_max), bool)
        for i, o in enumerate(obs):
            mask[i, :len(o)] = True
        act_dtype = np.float32 if np.asarray(action[0]).dtype.kind == "f" else np.int64
        return cls(pad(obs, np.float32), pad(action, act_dtype), pad(log_prob, np.float64),
                   pad(reward, np.float64), mask)

    @property
    def n(self) -> int:
        return self.mask.shape[0]

    @property
    def steps(self) -> int:
        return int(self.mask.sum())

    def deterministic_fraction(self) -> float:
        return float((self.log_prob[self.mask] == 0.0).mean()) if self.n else 0.0


@dataclass
class Terms:
    """What the estimators need about one target on one logged set, ``[N, T]`` each, zero on
    padding: per-decision log-ratios log π_e - log π_b, rewards, the target's value estimates."""

    log_ratio: np.ndarray
    reward: np.ndarray
    value: np.ndarray
    mask: np.ndarray
    # Windows (see :func:`windowed`): the episode each row came from; None: rows are episodes.
    group: np.ndarray | None = None

    @property
    def n_groups(self) -> int:
        """Independent units (episodes): what the bootstrap resamples."""
        return self.mask.shape[0] if self.group is None else int(self.group.max()) + 1


def windowed(terms: Terms, horizon: int, stride: int) -> Terms:
    """The terms of ``horizon``-step windows starting at every ``stride``-th step of every
    episode: the estimand becomes the expected discounted return over the next ``horizon``
    steps when the target takes over at a state the behaviour reached (section "Windows" of
    docs/ope.md). The ratios restart at each window's start, so weights stay usable for
    targets much further from the behaviour; the target's recurrent state there is its own,
    replayed over the episode's observations from its start."""
    if horizon < 1 or stride < 1:
        raise OPEError(f"window horizon and stride must be >= 1, got {horizon}, {stride}")
    n, t_max = terms.mask.shape
    lengths = terms.mask.sum(1)
    rows = [(i, t) for i in range(n) for t in range(0, int(lengths[i]), stride)]
    if not rows:
        raise OPEError("no steps to start a window at")
    ii, ss = (np.array(x) for x in zip(*rows, strict=True))
    cols = ss[:, None] + np.arange(horizon)[None, :]
    inside = cols < t_max
    cols = np.minimum(cols, t_max - 1)
    m = terms.mask[ii[:, None], cols] & inside

    def take(a: np.ndarray) -> np.ndarray:
        return np.where(m, a[ii[:, None], cols], 0.0)

    return Terms(take(terms.log_ratio), take(terms.reward), take(terms.value), m, ii)


# -- data ------------------------------------------------------------------------------------


def collect_episodes(bundle: Bundle, env_id: str, steps: int, seed: int = 0, *,
                     num_envs: int | None = None, env_kwargs: dict | None = None) -> Episodes:
    """Run ``bundle`` as the behaviour policy through the Policy API (stochastic sampling, as a
    device does) for about ``steps`` decisions; returns the complete episodes with the behaviour
    log-probabilities. ``num_envs`` defaults to ``steps // 256`` (one 256-period round of
    ProductionChain), between 1 and 256; episodes still running at the end are dropped."""
    n = num_envs or max(1, min(256, steps // 256))
    policy = Policy(bundle, "numpy")
    rng = np.random.default_rng(seed)
    # Instance i of a vector env is seeded base + i: spread the bases so that data sets of
    # nearby seeds do not share episodes.
    base = int(np.random.SeedSequence(seed).generate_state(1)[0] >> 1)
    env = make_vec_env(env_id, n, seed=base, **(env_kwargs or {}))
    obs, _ = env.reset(seed=base)
    state = policy.initial_state(n)
    hist: list[list[np.ndarray]] = [[], [], [], []]
    start = np.zeros(n, np.int64)
    spans: list[tuple[int, int, int]] = []     # (instance, first step, last step + 1)
    for t in range(-(-steps // n)):
        d = policy.act_batch(obs, state, rng=rng)
        action = np.asarray(d.action)
        nxt, reward, term, trunc, _ = env.step(action)
        for col, v in zip(hist, (obs, action, d.log_prob, reward), strict=True):
            col.append(v)
        ended = term | trunc
        for i in np.flatnonzero(ended):
            spans.append((int(i), int(start[i]), t + 1))
        start[ended] = t + 1
        keep = (~ended)[:, None].astype(np.float32)
        state = type(d.state)(d.state.h * keep, d.state.c * keep)
        obs = nxt
    cols = [np.stack(c) for c in hist]
    return Episodes.from_lists(*([c[a:b, i] for i, a, b in spans] for c in cols))


def episodes_from_sequences(seqs: Iterable) -> tuple[Episodes, dict]:
    """Reassemble episodes from :class:`cogbert_cloud.data.dataset.Sequence` runs.

    Runs of one device and session join when the earlier one did not end the episode and every
    outbox number between them belongs to another session's run (so none of this session's
    records can be missing). An episode starts at a run from the zero state (a fresh session) or
    right after a run that ended with done/truncated; one without a logged start or end is
    dropped and counted. Returns the episodes and ``{"episodes", "dropped_no_start", ...}``."""
    by_device: dict[str, list] = {}
    for s in seqs:
        by_device.setdefault(s.device, []).append(s)
    report = {"sequences": 0, "dropped_no_start": 0, "dropped_incomplete": 0}
    cols: list[list] = [[], [], [], []]
    for runs in by_device.values():
        runs.sort(key=lambda s: int(s.seqs[0]))
        report["sequences"] += len(runs)
        covered = np.unique(np.concatenate([s.seqs for s in runs]))
        sessions: dict[str, list] = {}
        for s in runs:
            sessions.setdefault(s.session, []).append(s)
        for runs_s in sessions.values():
            cur: list = []
            start_ok = after_end = False
            last_end = -1     # the outbox number that ended the previous episode (with after_end)
            for s in runs_s:
                fresh = not np.any(s.h0) and not np.any(s.c0)
                if cur and not fresh and _joined(covered, int(cur[-1].seqs[-1]), int(s.seqs[0])):
                    cur.append(s)
                else:
                    if cur:
                        report["dropped_incomplete"] += 1
                    start_ok = fresh or (after_end and _joined(covered, last_end, int(s.seqs[0])))
                    cur = [s]
                if bool(s.done[-1] or s.truncated[-1]):
                    if start_ok:
                        for k, name in enumerate(("obs", "action", "log_prob", "reward")):
                            cols[k].append(np.concatenate([getattr(r, name) for r in cur]))
                    else:
                        report["dropped_no_start"] += 1
                    after_end, last_end, cur = True, int(s.seqs[-1]), []
                else:
                    after_end = False
            report["dropped_incomplete"] += bool(cur)
    report["episodes"] = len(cols[0])
    return Episodes.from_lists(*cols), report


def _joined(covered: np.ndarray, last: int, first: int) -> bool:
    """Every outbox number strictly between ``last`` and ``first`` is in some run."""
    inside = np.searchsorted(covered, first) - np.searchsorted(covered, last, side="right")
    return first > last and inside == first - last - 1


def episodes_from_store(url: str, fleet: str | None = None) -> tuple[Episodes, dict]:
    """Episodes from the experience stored at ``url`` (``file://DIR`` or ``s3://...``)."""
    from cogbert_cloud.data.dataset import ExperienceDataset
    from cogbert_cloud.data.store import open_store
    return episodes_from_sequences(ExperienceDataset(open_store(url), fleet).sequences())


# -- the target along the logged episodes ----------------------------------------------------


def target_terms(bundle: Bundle, eps: Episodes, *, chunk: int = 512) -> Terms:
    """The target's log-probabilities of the logged actions and its values, by the reference
    numpy math over each episode from the zero state (see the module docstring)."""
    cfg = bundle.config
    if eps.obs.shape[-1] != cfg.obs_dim:
        raise OPEError(f"logged observations have {eps.obs.shape[-1]} values; the model takes {cfg.obs_dim}")
    if not np.isfinite(eps.log_prob[eps.mask]).all():
        raise OPEError("behaviour log-probabilities must be finite")
    # A probability is at most 1; a continuous action's log-density may be positive.
    if cfg.action.discrete and (eps.log_prob[eps.mask] > 1e-4).any():
        raise OPEError("behaviour log-probabilities of discrete actions must be <= 0")
    bounds = None if cfg.action.discrete else ActionBounds.from_extra(bundle.extra, cfg.action.size)
    F = NumpyMath(bundle.fp32_params())
    logp = np.zeros(eps.mask.shape)
    value = np.zeros(eps.mask.shape)
    for lo in range(0, eps.n, chunk):
        sl = slice(lo, lo + chunk)
        obs = np.ascontiguousarray(eps.obs[sl].transpose(1, 0, 2))
        t, b = obs.shape[:2]
        h = np.zeros((b, cfg.hidden), np.float32)
        head, v, _, _ = sequence(F, cfg, obs, h, h.copy(), np.zeros((t, b), np.float32), np.stack)
        act = eps.action[sl].swapaxes(0, 1)
        onehot = None
        if cfg.action.discrete:
            if act.min() < 0 or act.max() >= cfg.action.size:
                raise OPEError(f"logged actions outside [0, {cfg.action.size})")
            onehot = np.eye(cfg.action.size, dtype=np.float32)[act]
        if bounds is not None:
            # Devices log the squashed action they applied and its density: evaluate the
            # target's density of that same action (the Gaussian's at its pre-image, over the
            # squash's Jacobian; see cogbert_edge/inference/bounds.py).
            u = bounds.unsquash(act)
            logp[sl] = (log_prob(F, cfg, head.astype(np.float64), u, None) - bounds.log_det(u)).T
        else:
            logp[sl] = log_prob(F, cfg, head.astype(np.float64), act, onehot).T
        value[sl] = v.T
    m = eps.mask
    return Terms(np.where(m, logp - eps.log_prob, 0.0), np.where(m, eps.reward, 0.0), np.where(m, value, 0.0), m)


# -- estimators ------------------------------------------------------------------------------


def _parts(terms: Terms, gamma: float, calibrate: bool) -> dict[str, np.ndarray]:
    """Per-episode arrays whose count-weighted sums give every estimator (see :func:`_apply`)."""
    m, r = terms.mask, terms.reward
    n, t_max = m.shape
    disc = gamma ** np.arange(t_max)
    cum = np.cumsum(terms.log_ratio, axis=1)
    # Self-normalized weights are unchanged by a per-step constant: subtracting the column's
    # maximum keeps exp() finite whatever the horizon.
    w = np.exp(cum - cum.max(axis=0, keepdims=True))
    v = _calibrated(terms, gamma) if calibrate else terms.value
    v_next = np.concatenate([v[:, 1:], np.zeros((n, 1))], axis=1)
    delta = np.where(m, r + gamma * v_next - v, 0.0)
    parts = {"w_traj": w[:, -1], "wg_traj": w[:, -1] * (r * disc).sum(1), "w": w, "wr": w * r,
             "wd": w * delta, "v0": v[:, 0], "rows": np.ones(n)}
    if terms.group is not None:
        # Every estimator is linear in how often each row is drawn; a resample draws episodes,
        # so summing each episode's windows first gives the same estimates with N rows, not W.
        for k, a in parts.items():
            agg = np.zeros((terms.n_groups,) + a.shape[1:])
            np.add.at(agg, terms.group, a)
            parts[k] = agg
    parts["disc"] = disc
    return parts


def _calibrated(terms: Terms, gamma: float) -> np.ndarray:
    m = terms.mask
    t_max = m.shape[1]
    ret = np.zeros_like(terms.reward)
    acc = np.zeros(m.shape[0])
    for t in range(t_max - 1, -1, -1):
        acc = terms.reward[:, t] + gamma * acc
        ret[:, t] = acc
    steps = np.broadcast_to(np.arange(t_max) / max(t_max, 1), m.shape)
    x = np.stack([np.ones(m.sum()), terms.value[m], steps[m]], axis=1)
    coef, *_ = np.linalg.lstsq(x, ret[m], rcond=None)
    return np.where(m, coef[0] + coef[1] * terms.value + coef[2] * steps, 0.0)


def _apply(p: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every estimator for each row of ``counts [B, N]`` (how often each episode is drawn)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        den = counts @ p["w"]
        wis = (counts @ p["wg_traj"]) / (counts @ p["w_traj"])
        pdwis = ((counts @ p["wr"]) / den) @ p["disc"]
        dr = (counts @ p["v0"]) / (counts @ p["rows"]) + ((counts @ p["wd"]) / den) @ p["disc"]
    return {"wis": wis, "pdwis": pdwis, "dr": dr}


def estimate(terms: Terms, gamma: float = 0.99, *, calibrate: bool = True) -> dict[str, float]:
    """Point estimates of every estimator."""
    return _point(_parts(terms, gamma, calibrate))


def _point(parts: dict[str, np.ndarray]) -> dict[str, float]:
    out = _apply(parts, np.ones((1, len(parts["rows"]))))
    return {k: float(v[0]) for k, v in out.items()}


def ess(terms: Terms, gamma: float = 0.99) -> dict[str, float]:
    """Effective sample sizes (Σw)²/Σw²: of the trajectory weights (WIS), and the γ^t-weighted
    mean over steps of the per-decision weights' (PDWIS, DR). Both equal N on-policy."""
    cum = np.cumsum(terms.log_ratio, axis=1)
    w = np.exp(cum - cum.max(axis=0, keepdims=True))
    per_step = w.sum(0) ** 2 / (w ** 2).sum(0)
    if terms.group is not None:   # windows of one episode are not independent: episode units
        per_step = per_step * terms.n_groups / w.shape[0]
    disc = gamma ** np.arange(w.shape[1])
    decision = float(per_step @ disc / disc.sum())
    return {"wis": float(per_step[-1]), "pdwis": decision, "dr": decision}


def bootstrap_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` multinomial draw counts: each row a resample of the n episodes."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentile_ci(samples: np.ndarray, level: float) -> list[float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def _boot(parts: list[dict], counts: np.ndarray, chunk: int = 250) -> list[dict[str, np.ndarray]]:
    outs = [[_apply(p, counts[i:i + chunk]) for i in range(0, len(counts), chunk)] for p in parts]
    return [{k: np.concatenate([o[k] for o in out]) for k in ESTIMATORS} for out in outs]


def evaluate_target(terms: Terms, gamma: float = 0.99, *, level: float = 0.95, resamples: int = 1000,
                    seed: int = 0, calibrate: bool = True) -> dict:
    """Estimates, percentile-bootstrap CIs and effective sample sizes of one target."""
    _check_level(level, resamples)
    parts = _parts(terms, gamma, calibrate)
    (boot,) = _boot([parts], bootstrap_counts(terms.n_groups, resamples, seed))
    return {"estimates": _point(parts),
            "ci": {k: percentile_ci(boot[k], level) for k in ESTIMATORS}, "ess": ess(terms, gamma)}


def compare(candidate: Terms, baseline: Terms, gamma: float = 0.99, *, level: float = 0.95,
            resamples: int = 1000, seed: int = 0, calibrate: bool = True) -> dict:
    """Both policies on the same logged episodes, and the paired bootstrap of candidate - baseline
    (each resample draws the same episodes for both). ``{"estimates", "ci", "ess"}``, each keyed
    by ``candidate``, ``baseline`` and (estimates, ci) ``difference``, then by estimator."""
    _check_level(level, resamples)
    if candidate.mask.shape != baseline.mask.shape or candidate.n_groups != baseline.n_groups:
        raise OPEError("candidate and baseline terms must come from the same episodes")
    parts = [_parts(t, gamma, calibrate) for t in (candidate, baseline)]
    bc, bb = _boot(parts, bootstrap_counts(candidate.n_groups, resamples, seed))
    est_c, est_b = (_point(p) for p in parts)
    return {
        "estimates": {"candidate": est_c, "baseline": est_b,
                      "difference": {k: est_c[k] - est_b[k] for k in ESTIMATORS}},
        "ci": {"candidate": {k: percentile_ci(bc[k], level) for k in ESTIMATORS},
               "baseline": {k: percentile_ci(bb[k], level) for k in ESTIMATORS},
               "difference": {k: percentile_ci(bc[k] - bb[k], level) for k in ESTIMATORS}},
        "ess": {"candidate": ess(candidate, gamma), "baseline": ess(baseline, gamma)},
    }


def _check_level(level: float, resamples: int) -> None:
    if not 0.0 < level < 1.0:
        raise OPEError(f"confidence level must be in (0, 1), got {level}")
    if resamples < 10:
        raise OPEError(f"need at least 10 bootstrap resamples, got {resamples}")
