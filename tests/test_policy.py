"""The Policy API: decisions, behaviour log-probabilities, per-session state, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cogbert_edge import (
    ActionSpace,
    Bundle,
    ConfigError,
    ModelConfig,
    ObservationError,
    Policy,
    init_params,
)
from cogbert_edge.inference.backends import available_backends
from cogbert_edge.inference.model import NumpyMath, log_prob


@pytest.fixture(scope="module", params=available_backends())
def policy(request, bundles):
    return Policy(bundles["int8"], backend=request.param, seed=0)


def test_act_returns_action_log_prob_value_and_a_new_state(policy):
    s0 = policy.initial_state()
    obs = np.linspace(-1, 1, 64, dtype=np.float32)
    d = policy.act(obs, s0)
    assert isinstance(d.action, int) and 0 <= d.action < 8
    assert isinstance(d.log_prob, float) and d.log_prob < 0
    assert isinstance(d.value, float)
    assert d.state.h.shape == (256,) and not np.array_equal(d.state.h, s0.h)
    assert not s0.h.any() and not s0.c.any(), "act must not modify the caller's state"


def test_log_prob_is_the_log_probability_of_the_chosen_action(policy):
    state = policy.initial_state()
    obs = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    head, _, _ = policy.step(obs[None, :], State1(state))
    logp = head[0] - np.log(np.exp(head[0]).sum())
    for seed in range(20):
        d = policy.act(obs, state, rng=np.random.default_rng(seed))
        assert d.log_prob == pytest.approx(float(logp[d.action]), abs=1e-5)


def State1(state):
    from cogbert_edge import State
    return State(state.h[None, :], state.c[None, :])


def test_sampling_follows_the_policy_distribution(policy):
    state = policy.initial_state()
    obs = np.zeros(64, np.float32)
    head, _, _ = policy.step(obs[None, :], State1(state))
    p = np.exp(head[0] - head[0].max())
    p /= p.sum()
    rng = np.random.default_rng(1)
    counts = np.bincount([policy.act(obs, state, rng=rng).action for _ in range(4000)], minlength=8)
    assert np.abs(counts / 4000 - p).max() < 0.03


def test_same_rng_seed_gives_the_same_decisions_and_deterministic_is_argmax(policy):
    obs = np.random.default_rng(2).standard_normal((50, 64)).astype(np.float32)

    def run(seed):
        s, out, rng = policy.initial_state(), [], np.random.default_rng(seed)
        for x in obs:
            d = policy.act(x, s, rng=rng)
            s = d.state
            out.append(d.action)
        return out

    assert run(7) == run(7)
    s = policy.initial_state()
    d = policy.act(obs[0], s, deterministic=True)
    head, _, _ = policy.step(obs[:1], State1(s))
    assert d.action == int(head[0].argmax()) and d.log_prob == 0.0


def test_batch_form_equals_single_decisions(policy):
    rng = np.random.default_rng(3)
    obs = rng.standard_normal((6, 64)).astype(np.float32)
    batch = policy.act_batch(obs, policy.initial_state(6), deterministic=True)
    for i in range(6):
        single = policy.act(obs[i], policy.initial_state(), deterministic=True)
        assert single.action == batch.action[i]
        assert single.value == pytest.approx(float(batch.value[i]), abs=1e-5)
        np.testing.assert_allclose(single.state.h, batch.state.h[i], atol=1e-5)


def test_sessions_keep_separate_state_from_many_threads(bundles):
    policy = Policy(bundles["fp32"], seed=0)
    obs = np.random.default_rng(4).standard_normal((8, 100, 64)).astype(np.float32)

    def run(k):
        s = policy.initial_state()
        values = []
        for x in obs[k]:
            d = policy.act(x, s, deterministic=True)
            s = d.state
            values.append(d.value)
        return values

    expected = [run(k) for k in range(8)]
    results = [None] * 8

    def worker(k):
        results[k] = run(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.parametrize("bad,words", [
    (np.zeros(63, np.float32), "shape"),
    (np.zeros((1, 64), np.float32), "shape"),
    (np.array(["a"] * 64), "dtype"),
    (np.zeros(64, np.complex64), "dtype"),
    (np.zeros(64, bool), "dtype"),
    ([object()] * 64, "dtype"),
    (np.full(64, np.nan, np.float32), "NaN or Inf"),
    (np.r_[np.zeros(63), np.inf].astype(np.float32), "NaN or Inf"),
])
def test_bad_observations_get_a_clear_error(policy, bad, words):
    with pytest.raises(ObservationError, match=words):
        policy.act(bad, policy.initial_state())


def test_other_real_dtypes_are_converted(policy):
    s = policy.initial_state()
    a = policy.act(np.ones(64, np.float64), s, deterministic=True)
    b = policy.act(np.ones(64, np.int32), s, deterministic=True)
    c = policy.act([1.0] * 64, s, deterministic=True)
    assert a.action == b.action == c.action


def test_wrong_state_is_an_error(policy):
    with pytest.raises(ObservationError, match="state shape"):
        policy.act(np.zeros(64, np.float32), policy.initial_state(3))
    with pytest.raises(ObservationError, match="State"):
        policy.act(np.zeros(64, np.float32), (np.zeros(256), np.zeros(256)))


def test_sanitize_policy_replaces_nan_by_the_mean_and_inf_by_the_clip_bound(bundles):
    policy = Policy(bundles["fp32"], invalid_obs="sanitize", seed=0)
    s = policy.initial_state()
    obs = np.zeros(64, np.float32)
    dirty = obs.copy()
    dirty[3], dirty[5], dirty[7] = np.nan, np.inf, -np.inf
    clean = obs.copy()
    clean[5], clean[7] = 10.0, -10.0        # mean 0, std 1, clip 10
    a = policy.act(dirty, s, deterministic=True)
    b = policy.act(clean, s, deterministic=True)
    assert a.value == pytest.approx(b.value, abs=1e-6) and a.action == b.action
    assert policy.sanitized == 1
    with pytest.raises(ConfigError):
        Policy(bundles["fp32"], invalid_obs="ignore")


def test_continuous_actions_and_their_gaussian_log_prob():
    cfg = ModelConfig(obs_dim=8, action=ActionSpace.of_continuous(3), encoder=(32,), hidden=32)
    p = init_params(cfg, 0)
    p["policy.log_std"] = np.array([-0.5, 0.0, 0.3], np.float32)
    policy = Policy(Bundle.create(cfg, p), backend="numpy", seed=0)
    s = policy.initial_state()
    obs = np.ones(8, np.float32)
    d = policy.act(obs, s, rng=np.random.default_rng(0))
    assert d.action.shape == (3,)
    head, _, _ = policy.step(obs[None, :], State1(s))
    expect = log_prob(NumpyMath(p), cfg, head, d.action[None, :])[0]
    assert d.log_prob == pytest.approx(float(expect), abs=1e-5)
    det = policy.act(obs, s, deterministic=True)
    np.testing.assert_allclose(det.action, head[0], atol=1e-6)


def test_policy_loads_from_path_and_bytes(bundle_files, bundles):
    a = Policy.load(bundle_files["int4"], backend="numpy")
    b = Policy.load(bundles["int4"].to_bytes(), backend="numpy")
    assert a.model_id == b.model_id == "ref-int4"
    obs = np.ones(64, np.float32)
    assert a.act(obs, a.initial_state(), deterministic=True).value == pytest.approx(
        b.act(obs, b.initial_state(), deterministic=True).value)
