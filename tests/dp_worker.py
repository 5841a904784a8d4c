"""One process of the data-parallel check (run under ``mlx.launch``, or alone).

Every process builds the same PPO trainer and the same fixed rollout batch of 4 environments;
under ``mlx.launch -n 2`` each takes its half of the environments, and gradients are averaged
with ``mlx.distributed``. Rank 0 writes the parameters after one update.
"""

import sys

import numpy as np

from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer


def fixed_batch(T: int = 16, N: int = 4, obs_dim: int = 2, hidden: int = 16) -> dict:
    rng = np.random.default_rng(42)
    return {"obs": rng.standard_normal((T, N, obs_dim)).astype(np.float32),
            "h0": (0.1 * rng.standard_normal((N, hidden))).astype(np.float32),
            "c0": (0.1 * rng.standard_normal((N, hidden))).astype(np.float32),
            "starts": (rng.random((T, N)) < 0.1).astype(np.float32),
            "actions": rng.integers(0, 2, (T, N)).astype(np.int32),
            "logp": np.log(np.full((T, N), 0.5, np.float32)),
            "adv": rng.standard_normal((T, N)).astype(np.float32),
            "ret": rng.standard_normal((T, N)).astype(np.float32)}


def main(out: str) -> None:
    cfg = PPOConfig(env="CartPoleNoVel-v1", num_envs=4, epochs=1, minibatches=1, encoder=(16,), hidden=16,
                    lr=1e-2, seed=3)
    t = PPOTrainer(cfg)
    batch = fixed_batch()
    lo = t.dp.rank * t.env.num_envs
    mine = {k: (v[lo:lo + t.env.num_envs] if k in ("h0", "c0") else v[:, lo:lo + t.env.num_envs])
            for k, v in batch.items()}
    t.learn(mine, frac=1.0)
    if t.dp.rank == 0:
        np.savez(out, **t.params)


if __name__ == "__main__":
    main(sys.argv[1])
