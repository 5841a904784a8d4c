"""``cogbert-bench ope``: off-policy evaluation against simulated ground truth, and the gate's
error rates.

The behaviour and candidate policies are *soft heuristics*: Cogbert bundles (the real model, run
through the Policy API) whose weights are set by hand to the baseline rule of
``docs/production-chain.md`` section 7 (release below a base-stock level, maintain the most
worn station above a wear threshold, not while one is down), with the policy head's scale as an
inverse temperature: 0 is uniform random, large is the deterministic heuristic. Candidates of
known, different quality are then cheap: another temperature, base-stock level or threshold.
Each policy's value head is fit by ridge regression to its own discounted returns in
simulation (a Monte-Carlo critic), so DR has a learned value to work with.

For each candidate the suite logs ``--steps`` decisions of the behaviour policy, estimates the
candidate with WIS, PDWIS and DR (bootstrap CIs), and compares with the candidate's on-policy
mean over ``--truth-episodes`` simulated episodes. Then ``--trials`` seeded trials, each with
freshly logged data, run the gate on a truly worse and a truly better candidate.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import numpy as np

from cogbert_cloud.learn.baseline import fit_value_head, soft_heuristic
from cogbert_cloud.learn.gate import GateSettings, evaluate_candidate
from cogbert_cloud.learn.ope import ESTIMATORS, collect_episodes, evaluate_target, target_terms
from cogbert_edge import Bundle

ENV = "ProductionChain-v0"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ope", help="off-policy evaluation error vs simulation, and the gate's error rates")
    p.add_argument("--steps", type=int, default=50_000, help="logged behaviour decisions per data set")
    p.add_argument("--truth-episodes", type=int, default=2000, help="on-policy episodes per ground truth")
    p.add_argument("--trials", type=int, default=20, help="seeded gate trials per candidate")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--gamma", type=float, default=0.99, help="discount of the ground truth (whole episodes)")
    p.add_argument("--level", type=float, default=GateSettings.level, help="the gate's confidence level")
    p.add_argument("--horizon", type=int, default=GateSettings.horizon, help="the gate's window horizon "
                   "(0: whole episodes; the estimation-error table always uses whole episodes)")
    p.add_argument("--gate-gamma", type=float, default=GateSettings.gamma, help="the gate's discount")
    p.add_argument("--sim-episodes", type=int, default=200, help="paired simulator episodes of the gate's "
                   "simulator check (0: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def ground_truth(bundle: Bundle, gamma: float, episodes: int, seed: int,
                 env_kwargs: dict | None = None) -> np.ndarray:
    """Discounted on-policy returns of ``episodes`` simulated episodes (about; complete ones).
    The same seed gives every policy the same episodes' randomness: differences are paired."""
    eps = collect_episodes(bundle, ENV, episodes * 256, seed, env_kwargs=env_kwargs)
    return (eps.reward * gamma ** np.arange(eps.reward.shape[1])).sum(1)


# name -> soft_heuristic arguments; the behaviour (and gate baseline) is BEHAVIOUR
BEHAVIOUR: dict[str, Any] = dict(inv_temp=1.0)
CANDIDATES: dict[str, dict[str, Any]] = {
    "hotter_0.8": dict(inv_temp=0.8),
    "hotter_0.85": dict(inv_temp=0.85),
    "colder_1.15": dict(inv_temp=1.15),
    "colder_1.3": dict(inv_temp=1.3),
    "threshold_0.7": dict(inv_temp=1.0, threshold=0.7),
}


def main(args: argparse.Namespace) -> dict:
    t0 = time.monotonic()
    g = args.gamma
    specs = {"behaviour": BEHAVIOUR, **CANDIDATES}
    pols = {k: fit_value_head(soft_heuristic(**v), g, seed=900 + i) for i, (k, v) in enumerate(specs.items())}
    returns = {k: ground_truth(b, g, args.truth_episodes, 10_000) for k, b in pols.items()}
    truth = {k: float(r.mean()) for k, r in returns.items()}
    settings = GateSettings(gamma=args.gate_gamma, resamples=args.resamples, level=args.level,
                            horizon=args.horizon)
    # per trial: (estimate, lo, hi)
    est: dict[str, dict[str, list[tuple[float, ...]]]] = {k: {e: [] for e in ESTIMATORS} for k in pols}
    diff: dict[str, dict[str, list[tuple[float, ...]]]] = {k: {e: [] for e in ESTIMATORS} for k in CANDIDATES}
    ess_dr: dict[str, list] = {k: [] for k in pols}
    decisions: dict[str, list] = {k: [] for k in CANDIDATES}
    logged0 = None   # the first trial's log: the simulator check below runs on it
    for trial in range(args.trials):
        logged = collect_episodes(pols["behaviour"], ENV, args.steps, args.seed + trial)
        if logged0 is None:
            logged0 = logged
        for k, b in pols.items():
            r = evaluate_target(target_terms(b, logged), g, resamples=args.resamples, seed=trial)
            for e in ESTIMATORS:
                est[k][e].append((r["estimates"][e], *r["ci"][e]))
            ess_dr[k].append(r["ess"]["dr"])
        for k in CANDIDATES:
            d = evaluate_candidate(pols[k], pols["behaviour"], logged, settings=settings, seed=trial)
            decisions[k].append(d["decision"])
            for e in ESTIMATORS:
                diff[k][e].append((d["estimates"]["difference"][e], *d["ci"]["difference"][e]))
    rows = {}
    for k in pols:
        tm, sd = truth[k], float(returns[k].std())
        paired = returns[k] - returns["behaviour"]
        rows[k] = {"truth": round(tm, 3), "truth_se": round(sd / np.sqrt(len(returns[k])), 3),
                   "true_difference": round(float(paired.mean()), 3),
                   "true_difference_se": round(float(paired.std() / np.sqrt(len(paired))), 3),
                   "ess_dr_mean": round(float(np.mean(ess_dr[k])), 1)}
        for e in ESTIMATORS:
            x = np.asarray(est[k][e])
            err = x[:, 0] - tm
            rows[k][e] = {"trial0": [round(v, 3) for v in x[0]],
                          "mean_rel_error": round(float(np.mean(np.abs(err)) / abs(tm)), 3),
                          "rmse": round(float(np.sqrt(np.mean(err ** 2))), 3),
                          "rmse_in_sd": round(float(np.sqrt(np.mean(err ** 2)) / sd), 3),
                          "bias": round(float(err.mean()), 3),
                          "ci_coverage": round(float(np.mean((x[:, 1] <= tm) & (tm <= x[:, 2]))), 3)}
            if k in diff:
                y = np.asarray(diff[k][e])
                td = rows[k]["true_difference"]
                covered = (y[:, 1] <= td) & (td <= y[:, 2])
                rows[k][e]["difference"] = {"rmse": round(float(np.sqrt(np.mean((y[:, 0] - td) ** 2))), 3),
                                            "ci_coverage": round(float(np.mean(covered)), 3),
                                            "lower_above_truth": round(float(np.mean(y[:, 1] > td)), 3)}
        if k in decisions:
            rows[k]["gate"] = {"promote": decisions[k].count("promote"), "reject": decisions[k].count("reject"),
                               "reject_rate": round(decisions[k].count("reject") / len(decisions[k]), 3)}
    n_logged = args.steps // 256
    sim = {}
    for k in ("hotter_0.8", "colder_1.3") if args.sim_episodes and logged0 is not None else ():   # (trials > 0)
        s = replace(settings, sim_episodes=args.sim_episodes)
        d = evaluate_candidate(pols[k], pols["behaviour"], logged0, ENV, settings=s)
        sim[k] = {"decision": d["decision"], "sim": d["sim"], "reasons": d["reasons"]}
    return {"env": ENV, "gamma": g, "logged_steps_per_trial": args.steps, "trials": args.trials,
            "truth_episodes": len(returns["behaviour"]),
            "gate": {k: getattr(settings, k)
                     for k in ("estimator", "level", "margin", "min_ess", "min_episodes", "horizon", "gamma")},
            # What an on-policy Monte-Carlo mean of as many episodes would get wrong, on average.
            "on_policy_mean_rel_error_floor": round(float(np.sqrt(2 / np.pi) * returns["behaviour"].std()
                                                           / np.sqrt(n_logged) / abs(truth["behaviour"])), 3),
            "candidates": rows, "with_simulator": sim, "wall_s": round(time.monotonic() - t0, 1)}


def table(result: dict) -> str:
    lines = [f"{result['env']}: gamma {result['gamma']}, {result['trials']} trials of "
             f"{result['logged_steps_per_trial']} logged steps; mean relative error | CI coverage over trials",
             f"{'candidate':>14} {'truth':>7} {'diff':>6} " + " ".join(f"{k:>15}" for k in ESTIMATORS)
             + f" {'ESS':>6} {'gate reject':>11}"]
    for name, r in result["candidates"].items():
        cells = " ".join(f"{r[k]['mean_rel_error'] * 100:7.1f}% | {r[k]['ci_coverage']:.2f}" for k in ESTIMATORS)
        gate = f"{r['gate']['reject_rate']:.2f}" if "gate" in r else "-"
        lines.append(f"{name:>14} {r['truth']:7.2f} {r['true_difference']:6.2f} {cells} {r['ess_dr_mean']:6.1f} "
                     f"{gate:>11}")
    return "\n".join(lines)
