"""Behaviour cloning: a student of the PPO architecture learns the heuristic's decisions
(greedy agreement on fresh episodes far above chance), keeps every action possible (its logs
support off-policy evaluation), and ``cogbert cloud train --imitate`` refuses a teacher that
does not exist for the environment."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from cogbert_cloud.learn.envs import HeuristicPolicy, make_vec_env  # noqa: E402
from cogbert_cloud.learn.train.imitate import ImitateConfig, clone, heuristic_demonstrations  # noqa: E402
from cogbert_cloud.learn.train.ppo import PPOConfig  # noqa: E402
from cogbert_edge import Policy  # noqa: E402
from cogbert_edge.errors import ConfigError  # noqa: E402

ENV = "ProductionChain-v0"


def test_the_student_learns_the_heuristic_and_stays_stochastic():
    demos = heuristic_demonstrations(ENV, 8192, num_envs=32, seed=0)
    assert demos.obs.shape == (256, 32, 15) and demos.starts[0].all()
    student, info = clone(demos, PPOConfig(env=ENV, encoder=(32,), hidden=32),
                          ImitateConfig(epochs=10, chunk=32, batch_chunks=16, lr=5e-3), progress=False)
    assert info["agreement"] > 0.8, info
    # The value head learned returns in units of the demonstrations' return scale: the bundle says so.
    assert demos.return_scale > 1.0
    assert float(student.extra["x-return-scale"]) == pytest.approx(demos.return_scale)
    # Fresh episodes (other seeds): the student's greedy choice against the heuristic's.
    env = make_vec_env(ENV, 16, seed=999)
    obs, _ = env.reset(seed=999)
    policy, teacher = Policy(student, "numpy", seed=0), HeuristicPolicy()
    state = policy.initial_state(16)
    agree, logps = [], []
    for _ in range(128):
        greedy = policy.act_batch(obs, state, deterministic=True)
        sampled = policy.act_batch(obs, state)
        agree.append(np.asarray(greedy.action) == teacher.act(obs))
        logps.append(np.asarray(sampled.log_prob))
        obs, _, _, _, _ = env.step(np.asarray(sampled.action))
        state = sampled.state
    # 8 actions: chance is 1/8; the heuristic mostly repeats a few, so demand far more.
    assert np.mean(agree) > 0.75
    lp = np.concatenate(logps)
    assert (lp < 0).all() and np.mean(lp == 0.0) == 0.0


def test_the_heuristic_teacher_exists_only_for_production_chain():
    with pytest.raises(ConfigError, match="--imitate STORE_URL"):
        heuristic_demonstrations("CartPole-v1", 1024)
