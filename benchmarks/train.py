"""``cogbert-bench train``: learning speed and quality of the MLX trainer, optionally next to
Stable-Baselines3's RecurrentPPO (sb3-contrib) on the same budget in the same run.

Both learn ``--env`` for ``--steps`` environment steps; both are then evaluated on 20
episodes with greedy actions. Cogbert's evaluation runs the trained bundle through the Policy
API. The SB3 peer uses rl-baselines3-zoo's hyperparameters for CartPoleNoVel-v1 (8 envs, 32
steps, 20 epochs, lr 1e-3 linear, gamma 0.98, GAE 0.8, LSTM 64 with a separate critic LSTM,
normalized observations and rewards), on the same numpy environment through Gymnasium.

On ProductionChain it also compares the trained policy, sampling its actions as devices do,
with the documented heuristic on the same 1,000 seeds (``gain_vs_heuristic_pct``).

``--suite classic`` trains each task of :data:`SUITES` at its fixed budget, one after the other
in this process, and reports each return beside the published figure it is compared with
(rl-baselines3-zoo's ``benchmark.md``, one trained agent each, evaluated deterministically;
some at a larger budget than ours, which the row says). ``docs/training.md`` has the table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cogbert_cloud.learn.train import PPOTrainer, evaluate, preset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="learning speed and eval return of the MLX trainer (and SB3)")
    p.add_argument("--env", default="CartPoleNoVel-v1")
    p.add_argument("--suite", dest="task_suite", choices=sorted(SUITES), default=None,
                   help="train every task of the suite at its fixed budget (ignores --env/--steps)")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--peer", choices=("sb3",), default=None)
    p.add_argument("--heuristic-episodes", type=int, default=1000,
                   help="ProductionChain: episodes for the comparison with the heuristic (the same seeds)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def _env_id(name: str) -> str:
    return {"CartPoleNoVel": "CartPoleNoVel-v1", "ProductionChain": "ProductionChain-v0"}.get(name, name)


# (env, our budget, reference return, reference budget, reference). Discrete and continuous
# actions; CartPole-v1 fully observed beside CartPoleNoVel-v1, its partially observed variant.
# Box2D tasks (LunarLander) need box2d, whose PyPI build needs swig: not in this suite.
SUITES: dict[str, list[tuple[str, int, float, str, str]]] = {
    "classic": [
        ("CartPole-v1", 100_000, 500.0, "100k", "rl-zoo3 ppo"),
        ("CartPoleNoVel-v1", 100_000, 500.0, "100k", "rl-zoo3 ppo_lstm"),
        ("Acrobot-v1", 100_000, -73.5, "1M", "rl-zoo3 ppo"),
        ("Pendulum-v1", 100_000, -172.2, "100k", "rl-zoo3 ppo (gSDE)"),
        ("MountainCarContinuous-v0", 50_000, 88.3, "20k", "rl-zoo3 ppo (gSDE)"),
        ("ProductionChain-v0", 100_000, 32.8, "-", "the documented heuristic (docs/production-chain.md)"),
    ],
}


def _one(env: str, steps: int, seed: int, episodes: int) -> dict:
    trainer = PPOTrainer(preset(env, seed=seed))
    t0 = time.perf_counter()
    run = trainer.train(steps, progress=False)
    wall = time.perf_counter() - t0
    returns = evaluate(trainer.bundle(), env, episodes, seed=10_000 + seed)
    return {"env": env, "steps": run["steps"], "wall_s": round(wall, 1), "steps_per_s": round(run["steps"] / wall, 1),
            "eval_mean_return": float(np.mean(returns)), "eval_std_return": float(np.std(returns)),
            "eval_episodes": len(returns), "action": "discrete" if trainer.discrete else "continuous"}


def suite(name: str, seed: int, episodes: int) -> dict:
    import os
    rows = []
    for env, steps, ref, ref_budget, ref_what in SUITES[name]:
        row = _one(env, steps, seed, episodes)
        row.update(reference_return=ref, reference_budget=ref_budget, reference=ref_what)
        rows.append(row)
    return {"suite": f"train-{name}", "seed": seed, "load_1m": round(os.getloadavg()[0], 2), "tasks": rows,
            "trainer": "cogbert MLX recurrent PPO"}


def main(args: argparse.Namespace) -> dict:
    if args.task_suite:
        return suite(args.task_suite, args.seed, args.episodes)
    env = _env_id(args.env)
    trainer = PPOTrainer(preset(env, seed=args.seed))
    t0 = time.perf_counter()
    run = trainer.train(args.steps, progress=False)
    wall = time.perf_counter() - t0
    returns = evaluate(trainer.bundle(), env, args.episodes, seed=10_000 + args.seed)
    out = {"suite": "train", "env": env, "steps": run["steps"], "wall_s": round(wall, 1),
           "steps_per_s": round(run["steps"] / wall, 1), "eval_mean_return": float(np.mean(returns)),
           "eval_std_return": float(np.std(returns)), "eval_episodes": len(returns), "seed": args.seed,
           "trainer": "cogbert MLX recurrent PPO"}
    if env == "ProductionChain-v0":
        out.update(_against_heuristic(trainer.bundle(), args.heuristic_episodes, seed=2026))
    if args.peer == "sb3":
        out["peer"] = _sb3(env, args.steps, args.seed, args.episodes)
        out["wall_ratio_vs_peer"] = round(out["wall_s"] / out["peer"]["wall_s"], 3)
    return out


def _against_heuristic(bundle, episodes: int, seed: int) -> dict:
    """The issue's comparison: the trained policy sampling its actions, as devices run it,
    against the documented heuristic on the same ``episodes`` seeds."""
    from cogbert_cloud.learn.envs import HeuristicPolicy
    from cogbert_cloud.learn.envs import evaluate as evaluate_heuristic

    trained = np.asarray(evaluate(bundle, "ProductionChain-v0", episodes, seed=seed, deterministic=False))
    heuristic = np.asarray(evaluate_heuristic(lambda e: HeuristicPolicy(), episodes, seed=seed))
    d = trained - heuristic
    se = lambda x: float(x.std() / np.sqrt(len(x)))  # noqa: E731
    return {"sampled_mean_return": float(trained.mean()), "sampled_se": se(trained),
            "heuristic_mean_return": float(heuristic.mean()), "heuristic_se": se(heuristic),
            "paired_difference": float(d.mean()), "paired_difference_se": se(d),
            "gain_vs_heuristic_pct": round(100.0 * (trained.mean() / heuristic.mean() - 1.0), 1),
            "heuristic_episodes": episodes}


def _sb3(env_id: str, steps: int, seed: int, episodes: int) -> dict:
    import gymnasium as gym
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    import cogbert_cloud.learn.envs  # noqa: F401 - registers the ids

    torch.set_num_threads(1)
    venv = VecNormalize(DummyVecEnv([lambda: gym.make(env_id) for _ in range(8)]), norm_obs=True, norm_reward=True)
    venv.seed(seed)
    lin = lambda v: (lambda frac: v * frac)  # noqa: E731
    model = RecurrentPPO("MlpLstmPolicy", venv, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
                         n_epochs=20, ent_coef=0.0, learning_rate=lin(1e-3), clip_range=lin(0.2), seed=seed,
                         policy_kwargs=dict(ortho_init=False, activation_fn=torch.nn.ReLU, lstm_hidden_size=64,
                                            enable_critic_lstm=True, net_arch=dict(pi=[64], vf=[64])), verbose=0)
    t0 = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - t0
    venv.training, venv.norm_reward = False, False
    returns = []
    for ep in range(episodes):
        single = gym.make(env_id)
        obs, _ = single.reset(seed=10_000 + seed + ep)
        state, start, total, done = None, np.ones((1,), bool), 0.0, False
        while not done:
            action, state = model.predict(venv.normalize_obs(obs[None]), state=state, episode_start=start,
                                          deterministic=True)
            obs, r, term, trunc, _ = single.step(int(action[0]))
            total += float(r)
            done, start = term or trunc, np.zeros((1,), bool)
        returns.append(total)
    return {"trainer": "sb3-contrib RecurrentPPO (rl-zoo hyperparameters)", "steps": steps, "wall_s": round(wall, 1),
            "steps_per_s": round(steps / wall, 1), "eval_mean_return": float(np.mean(returns)),
            "eval_episodes": len(returns)}


def table(result: dict) -> str:
    if "tasks" in result:
        lines = ["| task | actions | budget | return (20 ep.) | wall s | reference |", "|---|---|---|---|---|---|"]
        for r in result["tasks"]:
            lines.append(f"| {r['env']} | {r['action']} | {r['steps']} | {r['eval_mean_return']:.1f} | {r['wall_s']} | "
                         f"{r['reference_return']} at {r['reference_budget']} ({r['reference']}) |")
        return "\n".join(lines)
    lines = [f"{result['trainer']}: {result['env']} {result['steps']} steps in {result['wall_s']} s "
             f"({result['steps_per_s']}/s), eval return {result['eval_mean_return']:.1f} "
             f"over {result['eval_episodes']}"]
    if "gain_vs_heuristic_pct" in result:
        lines.append(f"sampled {result['sampled_mean_return']:.1f} vs heuristic {result['heuristic_mean_return']:.1f} "
                     f"over {result['heuristic_episodes']} episodes: {result['gain_vs_heuristic_pct']:+.1f} %")
    if "peer" in result:
        p = result["peer"]
        lines.append(f"{p['trainer']}: {p['wall_s']} s ({p['steps_per_s']}/s), eval return {p['eval_mean_return']:.1f}")
    return "\n".join(lines)

