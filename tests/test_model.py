"""The model definition: its step, batch and sequence forms agree, and its config is strict."""

from __future__ import annotations

import numpy as np
import pytest

from cogbert_edge import ActionSpace, ConfigError, ModelConfig, init_params
from cogbert_edge.inference.model import NumpyMath, entropy, log_prob, sequence, step


def test_batch_step_equals_each_row_stepped_alone(config, params):
    F = NumpyMath(params)
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((5, config.obs_dim)).astype(np.float32)
    h = rng.standard_normal((5, config.hidden)).astype(np.float32) * 0.3
    c = rng.standard_normal((5, config.hidden)).astype(np.float32) * 0.3
    head, value, h2, c2 = step(F, config, obs, h, c)
    for i in range(5):
        hi, vi, h2i, c2i = step(F, config, obs[i:i + 1], h[i:i + 1], c[i:i + 1])
        np.testing.assert_allclose(head[i], hi[0], atol=1e-5)
        np.testing.assert_allclose(value[i], vi[0], atol=1e-5)
        np.testing.assert_allclose(h2[i], h2i[0], atol=1e-5)
        np.testing.assert_allclose(c2[i], c2i[0], atol=1e-5)


def test_sequence_equals_repeated_steps_with_resets_at_episode_starts(config, params):
    F = NumpyMath(params)
    rng = np.random.default_rng(1)
    T, B = 25, 3
    obs = rng.standard_normal((T, B, config.obs_dim)).astype(np.float32)
    starts = np.zeros((T, B), np.float32)
    starts[0, :] = 1
    starts[7, 0] = starts[12, 2] = starts[20, 1] = 1
    h0 = rng.standard_normal((B, config.hidden)).astype(np.float32)
    c0 = rng.standard_normal((B, config.hidden)).astype(np.float32)
    heads, values, hT, cT = sequence(F, config, obs, h0, c0, starts, np.stack)

    h, c = h0, c0
    for t in range(T):
        keep = (1 - starts[t])[:, None]
        head, value, h, c = step(F, config, obs[t], h * keep, c * keep)
        np.testing.assert_allclose(heads[t], head, atol=1e-5)
        np.testing.assert_allclose(values[t], value, atol=1e-5)
    np.testing.assert_allclose(hT, h, atol=1e-5)
    np.testing.assert_allclose(cT, c, atol=1e-5)


def test_reset_state_makes_history_irrelevant(config, params):
    F = NumpyMath(params)
    rng = np.random.default_rng(2)
    obs = rng.standard_normal((1, config.obs_dim)).astype(np.float32)
    z = np.zeros((1, config.hidden), np.float32)
    a = step(F, config, obs, z, z)[0]
    noisy = rng.standard_normal((1, config.hidden)).astype(np.float32)
    b = step(F, config, obs, noisy, noisy)[0]
    assert np.abs(a - b).max() > 1e-3, "the recurrent state must influence the decision"


def test_observation_normalisation_and_clip_are_part_of_the_model(config, params):
    p = dict(params)
    p["obs_norm.mean"] = np.full(config.obs_dim, 5.0, np.float32)
    p["obs_norm.std"] = np.full(config.obs_dim, 2.0, np.float32)
    F, F0 = NumpyMath(p), NumpyMath(params)
    z = np.zeros((1, config.hidden), np.float32)
    raw = np.full((1, config.obs_dim), 7.0, np.float32)       # standardizes to 1.0
    ones = np.ones((1, config.obs_dim), np.float32)
    np.testing.assert_allclose(step(F, config, raw, z, z)[0], step(F0, config, ones, z, z)[0], atol=1e-5)
    huge = np.full((1, config.obs_dim), 1e6, np.float32)      # clipped to obs_clip
    at_clip = np.full((1, config.obs_dim), config.obs_clip, np.float32)
    np.testing.assert_allclose(step(F0, config, huge, z, z)[0], step(F0, config, at_clip, z, z)[0], atol=1e-5)


def test_discrete_log_prob_and_entropy(config, params):
    F = NumpyMath(params)
    head = np.random.default_rng(3).standard_normal((4, config.action.size)).astype(np.float32)
    probs = np.exp(head) / np.exp(head).sum(-1, keepdims=True)
    actions = np.array([0, 3, 7, 2])
    onehot = np.eye(config.action.size)[actions]
    np.testing.assert_allclose(log_prob(F, config, head, actions, onehot),
                               np.log(probs[np.arange(4), actions]), rtol=1e-5)
    np.testing.assert_allclose(entropy(F, config, head), -(probs * np.log(probs)).sum(-1), rtol=1e-5)


def test_gaussian_log_prob_and_entropy():
    cfg = ModelConfig(obs_dim=6, action=ActionSpace.of_continuous(3), encoder=(32,), hidden=16)
    p = init_params(cfg, 0)
    p["policy.log_std"] = np.array([0.0, -1.0, 0.5], np.float32)
    F = NumpyMath(p)
    mean = np.array([[0.1, -0.2, 0.3]], np.float32)
    a = np.array([[0.0, 0.0, 1.0]], np.float32)
    std = np.exp(p["policy.log_std"])
    expect = (-0.5 * ((a - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi))).sum()
    np.testing.assert_allclose(log_prob(F, cfg, mean, a), [expect], rtol=1e-5)
    np.testing.assert_allclose(entropy(F, cfg, mean), [(0.5 + 0.5 * np.log(2 * np.pi) + np.log(std)).sum()],
                               rtol=1e-5)


def test_init_is_orthogonal_with_the_stated_gains(config):
    p = init_params(config, seed=4, policy_gain=0.01)
    w = p["lstm.hh.weight"]                      # [1024, 256]: orthonormal columns
    np.testing.assert_allclose(w.T @ w, np.eye(config.hidden), atol=1e-4)
    pol = p["policy.weight"]                     # [8, 256]: orthonormal rows, scaled
    np.testing.assert_allclose(pol @ pol.T, 1e-4 * np.eye(8), atol=1e-7)
    assert not p["lstm.ih.bias"].any()


def test_reference_model_has_the_stated_arithmetic(config):
    # obs 64 -> 256 encoder, LSTM 256 (two 256x1024 products), 8 logits + value
    assert config.macs_per_step() == 64 * 256 + 2 * 256 * 1024 + 256 * 8 + 256


def test_config_round_trips_and_rejects_bad_values(config):
    assert ModelConfig.from_dict(config.to_dict()) == config
    for bad in [dict(obs_dim=0), dict(obs_dim=True), dict(hidden=10**6), dict(encoder=(0,)),
                dict(encoder=(8,) * 9), dict(obs_clip=float("nan")), dict(obs_clip=-1)]:
        kwargs = dict(obs_dim=4, action=ActionSpace.of_discrete(2))
        kwargs.update(bad)
        with pytest.raises(ConfigError):
            ModelConfig(**kwargs)
    with pytest.raises(ConfigError):
        ActionSpace("multibinary", 3)
    d = config.to_dict()
    d["surprise"] = 1
    with pytest.raises(ConfigError, match="unexpected keys"):
        ModelConfig.from_dict(d)
