"""Continuous actions past PPO: off-policy evaluation and V-trace read the squashed action a
device applied and the density it logged, so the same policy's importance ratio is exactly 1,
positive log-densities are accepted, and V-trace moves a bounded Gaussian towards the action
the logs show pays."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from cogbert_cloud.data.dataset import Sequence  # noqa: E402
from cogbert_cloud.learn.gate import evaluate_candidate  # noqa: E402
from cogbert_cloud.learn.ope import collect_episodes, target_terms  # noqa: E402
from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer  # noqa: E402
from cogbert_cloud.learn.train.vtrace import VTraceConfig, VTraceTrainer  # noqa: E402
from cogbert_edge import Bundle, Policy  # noqa: E402
from cogbert_edge.inference.bounds import ActionBounds  # noqa: E402


def _pendulum(log_std: float = 0.0) -> Bundle:
    t = PPOTrainer(PPOConfig(env="Pendulum-v1", num_envs=2, encoder=(16,), hidden=16, log_std_init=log_std))
    return t.bundle()


def test_ope_gives_the_behaviour_policy_a_ratio_of_one_on_its_own_squashed_logs():
    behaviour = _pendulum(log_std=-2.0)     # narrow: densities above 1, log-densities > 0
    assert ActionBounds.from_extra(behaviour.extra, 1) is not None
    eps = collect_episodes(behaviour, "Pendulum-v1", 1600, num_envs=4)
    assert eps.n == 8 and (eps.log_prob[eps.mask] > 0).any()
    a = eps.action[eps.mask]
    assert (np.abs(a) < 2.0).all()
    terms = target_terms(behaviour, eps)
    assert np.abs(terms.log_ratio[eps.mask]).max() < 1e-3
    # A different target gets different ratios (the check above could not pass by accident).
    other = dict(behaviour.tensors)
    other["policy.bias"] = other["policy.bias"] + 0.5
    shifted = Bundle.create(behaviour.config, other, extra=dict(behaviour.extra))
    assert np.abs(target_terms(shifted, eps).log_ratio[eps.mask]).mean() > 0.1


def test_the_gate_evaluates_continuous_candidates():
    behaviour = _pendulum(log_std=-0.5)
    eps = collect_episodes(behaviour, "Pendulum-v1", 12_800, num_envs=64)
    out = evaluate_candidate(behaviour, behaviour, eps, "Pendulum-v1", min_episodes=32, sim_episodes=16,
                             horizon=0)
    assert out["n_episodes"] == 64 and out["sim"]["difference"] == 0.0
    # Ratios of 1 on every logged step: the whole sample is effective, and a candidate equal to
    # the baseline is no improvement, so the gate does not promote it.
    assert out["ess"]["candidate"]["dr"] == pytest.approx(64, rel=1e-6)
    assert out["estimates"]["difference"]["dr"] == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(out["estimates"]["candidate"]["dr"]) and out["decision"] == "reject"


def test_vtrace_moves_a_bounded_gaussian_towards_the_action_the_logs_show_pays():
    behaviour = _pendulum(log_std=0.0)
    policy = Policy(behaviour, "numpy", seed=1)
    rng = np.random.default_rng(1)
    seqs = []
    for i in range(48):
        state = policy.initial_state()
        h0, c0 = np.array(state.h), np.array(state.c)
        obs = rng.standard_normal((24, 3)).astype(np.float32)
        acts, logp, val = [], [], []
        for t in range(24):
            d = policy.act(obs[t], state)
            acts.append(np.asarray(d.action, np.float32)), logp.append(float(d.log_prob)), val.append(float(d.value))
            state = d.state
        a = np.stack(acts)
        done = np.zeros(24, bool)
        done[-1] = True
        reward = (-(a[:, 0] - 1.5) ** 2).astype(np.float32)
        seqs.append(Sequence("dev", f"s{i}", np.arange(24), obs, a, np.array(logp), np.array(val), reward, done,
                             np.zeros(24, bool), ["m"] * 24, h0, c0))
    trainer = VTraceTrainer(behaviour, VTraceConfig(lr=3e-3, epochs=30, seed=0, burn_in=2, gamma=0.0))
    info = trainer.train(seqs, progress=False)
    assert 0.8 < info["mean_ratio"] < 1.25, info      # logged by the starting policy: ratios start at 1
    after = trainer.bundle()
    assert ActionBounds.from_extra(after.extra, 1) is not None
    probe = rng.standard_normal((2000, 3)).astype(np.float32)

    def mean_action(b: Bundle) -> float:
        p = Policy(b, "numpy", seed=2)
        return float(np.mean(np.asarray(p.act_batch(probe, p.initial_state(len(probe))).action)))

    assert abs(mean_action(behaviour)) < 0.3 and mean_action(after) > 0.8
