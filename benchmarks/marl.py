"""``cogbert-bench marl``: team return of MAPPO and IPPO against a heuristic team policy and random
play at a fixed budget, with wall time, on ``ProductionLine-v0`` or ``mpe2:simple_spread_v3``.

Every policy is evaluated on the same seeds (common random numbers on the line), the trained ones
through the Policy API with sampled actions, as devices run them (greedy play is reported too).
The line's heuristic is tuned on a grid over seeds disjoint from the evaluation seeds, and the
grid's winner is printed. On simple_spread the published MAPPO figure is printed beside ours with
the budget difference and the reward convention.

Reward conventions: the line's *team return* is the episode sum of the shared team reward. On
simple_spread the trainer sets ``local_ratio=0`` (every agent receives the same shared reward,
as in the original MPE that MAPPO was published on), and the return printed is the episode sum
of that reward, which equals the mean over agents of their returns (EPyMARL's per-agent-averaged
convention: MAPPO about -120 after 20M steps with 128 environments; Yu et al. 2022).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_cloud.learn.envs.production_line import (
    HeuristicTeamPolicy,
    ProductionLineConfig,
    RandomTeamPolicy,
    evaluate_team,
)
from cogbert_cloud.learn.marl import MARLTrainer, evaluate_bundles, make_marl_env, marl_preset

PUBLISHED = {"mpe2:simple_spread_v3": {
    "algorithm": "MAPPO (Yu et al. 2022; EPyMARL convention)", "return": -120.0, "steps": 20_000_000,
    "num_envs": 128,
    "convention": "episode sum of the shared team reward (= per-agent-averaged return), 25 steps, 3 agents"}}
EVAL_SEED = 20_260
TUNE_SEED = 90_000


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("marl", help="MAPPO and IPPO against the heuristic team policy and random play")
    p.add_argument("--env", default="ProductionLine-v0", help="ProductionLine-v0 or mpe2:simple_spread_v3")
    p.add_argument("--steps", type=int, default=300_000, help="environment steps per algorithm")
    p.add_argument("--algos", default="mappo,ippo", help="comma-separated: mappo, ippo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=500, help="evaluation episodes (the same seeds for all)")
    p.add_argument("--roles", default="shared", help="shared or per_agent")
    p.add_argument("--curves", type=Path, help="write the training curves here (JSON)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def _ci(x: np.ndarray) -> float:
    return float(1.96 * np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def _summary(returns: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(returns)), "ci95": _ci(returns), "std": float(np.std(returns))}


def _line_heuristic(episodes: int) -> tuple[HeuristicTeamPolicy, dict]:
    cfg = ProductionLineConfig()
    grid = []
    for th in (0.4, 0.6, 0.8, 1.0, 1.2):
        for w in (2, 3, 4, 5, 6):
            for f in (3, 4, 5, 6, 8):
                r = evaluate_team(HeuristicTeamPolicy(cfg, threshold=th, wip_target=w, fg_target=f), 200, TUNE_SEED)
                grid.append((float(r.mean()), th, w, f))
    best = max(grid)
    return (HeuristicTeamPolicy(cfg, threshold=best[1], wip_target=best[2], fg_target=best[3]),
            {"threshold": best[1], "wip_target": best[2], "fg_target": best[3], "tuning_return": best[0],
             "grid_size": len(grid), "tuning_seeds": f"{TUNE_SEED}..{TUNE_SEED + 199}"})


class SpreadHeuristic:
    """simple_spread's hand-written team policy: agent ``k`` heads for landmark ``k`` (every agent
    sees the landmarks in the same order, so the assignment needs no communication), moving along
    the axis with the larger distance; no-op within 0.05."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        N, A, _ = obs.shape
        rel = np.stack([obs[:, k, 4 + 2 * k: 6 + 2 * k] for k in range(A)], axis=1)   # [N, A, 2]
        dx, dy = rel[..., 0], rel[..., 1]
        horiz = np.abs(dx) >= np.abs(dy)
        # mpe2 discrete actions: 0 no-op, 1 left, 2 right, 3 down, 4 up.
        a = np.where(horiz, np.where(dx < 0, 1, 2), np.where(dy < 0, 3, 4))
        return np.where(np.maximum(np.abs(dx), np.abs(dy)) < 0.05, 0, a)


class _UniformRandom:
    def __init__(self, n_actions: int, seed: int) -> None:
        self.n, self.rng = n_actions, np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, self.n, size=obs.shape[:2])


def _play(env_id: str, policy: Any, episodes: int, seed: int) -> np.ndarray:
    env = make_marl_env(env_id, episodes, seed)
    obs, _ = env.reset(seed)
    total = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    while not done.all():
        obs, _, r, dones, _ = env.step(policy.act(obs))
        total += np.where(done, 0.0, r.mean(axis=1))
        done |= dones
    return total


def main(args: argparse.Namespace) -> dict:
    env_id = {"ProductionLine": "ProductionLine-v0", "simple_spread_v3": "mpe2:simple_spread_v3"}.get(args.env,
                                                                                                      args.env)
    line = env_id == "ProductionLine-v0"
    out: dict[str, Any] = {"suite": "marl", "env": env_id, "steps": args.steps, "seed": args.seed,
                           "eval_episodes": args.episodes,
                           "eval_seeds": f"{EVAL_SEED}..{EVAL_SEED + args.episodes - 1}"}
    t0 = time.perf_counter()
    if line:
        heur, tuned = _line_heuristic(args.episodes)
        h = evaluate_team(heur, args.episodes, EVAL_SEED)
        rnd = evaluate_team(RandomTeamPolicy(ProductionLineConfig(), seed=1), args.episodes, EVAL_SEED)
        out["heuristic_params"] = tuned
        out["reward_convention"] = "team return: episode sum (128 periods) of the shared team reward"
    else:
        e = make_marl_env(env_id, 1, 0)
        h = _play(env_id, SpreadHeuristic(), args.episodes, EVAL_SEED)
        rnd = _play(env_id, _UniformRandom(e.n_actions, 1), args.episodes, EVAL_SEED)
        out["published"] = PUBLISHED.get(env_id)
        out["reward_convention"] = PUBLISHED[env_id]["convention"] if env_id in PUBLISHED else "mean over agents"
    out["heuristic"] = _summary(h)
    out["random"] = _summary(rnd)
    out["baselines_wall_s"] = round(time.perf_counter() - t0, 1)
    curves = {}
    for algo in [a.strip() for a in args.algos.split(",") if a.strip()]:
        critic = {"mappo": "central", "ippo": "local"}[algo]
        cfg = marl_preset(env_id, critic=critic, seed=args.seed, roles=args.roles)
        trainer = MARLTrainer(cfg)
        t1 = time.perf_counter()
        run = trainer.train(args.steps)
        wall = time.perf_counter() - t1
        bundles = trainer.bundles()
        sampled = evaluate_bundles(bundles, trainer.role_map(), env_id, args.episodes, seed=EVAL_SEED)
        greedy = evaluate_bundles(bundles, trainer.role_map(), env_id, args.episodes, seed=EVAL_SEED,
                                  deterministic=True)
        diff = sampled - h
        res = {"sampled": _summary(sampled), "greedy": _summary(greedy), "wall_s": round(wall, 1),
               "steps": run["steps"], "steps_per_s": round(run["steps"] / wall, 1),
               "agent_decisions_per_s": round(run["steps"] * trainer.A / wall, 1),
               "vs_heuristic": {"paired_diff_mean": float(diff.mean()), "paired_diff_ci95": _ci(diff),
                                "gain_pct": float(100 * diff.mean() / abs(h.mean())) if h.mean() else None},
               "config": {k: v for k, v in vars(cfg).items() if k != "env_kwargs"}}
        if not line and env_id in PUBLISHED:
            res["budget_fraction_of_published"] = run["steps"] / PUBLISHED[env_id]["steps"]
        out[algo] = res
        curves[algo] = [{"steps": r["steps"], "episode_return": r["episode_return"], "wall_s": r["wall_s"]}
                        for r in trainer.curve]
    if args.curves:
        args.curves.write_text(json.dumps({"env": env_id, "heuristic": out["heuristic"]["mean"],
                                           "random": out["random"]["mean"], "curves": curves}))
    out["total_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def table(result: dict) -> str:
    lines = [f"{result['env']}: {result['reward_convention']}; {result['eval_episodes']} evaluation episodes "
             f"(seeds {result['eval_seeds']}), budget {result['steps']} steps per algorithm"]
    for name in ("random", "heuristic"):
        s = result[name]
        lines.append(f"  {name:<10} {s['mean']:9.2f} ± {s['ci95']:.2f}")
    for algo in ("mappo", "ippo"):
        if algo in result:
            r = result[algo]
            v = r["vs_heuristic"]
            lines.append(f"  {algo:<10} {r['sampled']['mean']:9.2f} ± {r['sampled']['ci95']:.2f} sampled, "
                         f"{r['greedy']['mean']:.2f} greedy; vs heuristic {v['paired_diff_mean']:+.2f} "
                         f"± {v['paired_diff_ci95']:.2f} ({r['wall_s']} s, {r['steps_per_s']} steps/s)")
    if result.get("published"):
        p = result["published"]
        lines.append(f"  published  {p['return']:9.2f} ({p['algorithm']}, {p['steps']:,} steps, "
                     f"{p['num_envs']} envs; ours used {result['steps']:,})")
    return "\n".join(lines)


def plot(curve_files: list[Path], out: Path) -> None:
    """Training curves (episode return against steps, smoothed over 5 updates) of ``--curves`` files,
    with the heuristic's and random play's evaluation means as lines: ``python -m cogbert_bench.marl
    OUT.png CURVES.json ...``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    base = None
    for f in curve_files:
        d = json.loads(Path(f).read_text())
        base = base or d
        for algo, rows in d["curves"].items():
            x = np.array([r["steps"] for r in rows if r["episode_return"] is not None])
            y = np.array([r["episode_return"] for r in rows if r["episode_return"] is not None])
            k = min(5, len(y))
            ys = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1:], ys, label=f"{algo.upper()} ({x[-1]:,} steps)")
    if base is not None:
        ax.axhline(base["heuristic"], color="k", ls="--", label="heuristic (eval)")
        ax.axhline(base["random"], color="gray", ls=":", label="random (eval)")
        ax.set_title(f"{base['env']}: training team return")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("team return per episode")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    import sys
    plot([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]))
