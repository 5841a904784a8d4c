"""Simulators: Gymnasium API, seeding, single/vector identity, CartPole parity, and the claims
docs/production-chain.md makes about ProductionChain (partial observability, baselines)."""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from cogbert_cloud.learn.envs import (
    ENV_IDS,
    CartPoleNoVelEnv,
    CartPoleNoVelVecEnv,
    CartPoleVecEnv,
    HeuristicPolicy,
    MemoryHeuristicPolicy,
    NoOpPolicy,
    OraclePolicy,
    ProductionChainConfig,
    ProductionChainEnv,
    ProductionChainVecEnv,
    RandomPolicy,
    decode_action,
    encode_action,
    evaluate,
    make_env,
    make_vec_env,
    observation_names,
)
from cogbert_cloud.learn.envs.heuristics import Observation, _poisson_pmf
from cogbert_edge import ConfigError

CFG = ProductionChainConfig()
T = CFG.episode_length
SINGLE = {"CartPoleNoVel-v1": CartPoleNoVelEnv, "ProductionChain-v0": ProductionChainEnv}
VECTOR = {"CartPoleNoVel-v1": CartPoleNoVelVecEnv, "ProductionChain-v0": ProductionChainVecEnv}


def rollout_single(env, seed, actions):
    """Observations, rewards and done flags of a single env under ``actions``, resetting
    (without a seed) whenever an episode ends."""
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards, dones = [], []
    for a in actions:
        obs, r, term, trunc, _ = env.step(int(a))
        rewards.append(r)
        dones.append(term or trunc)
        if term or trunc:
            obs, _ = env.reset()
        out.append(obs)
    return np.array(out), np.array(rewards), np.array(dones)


# -- Gymnasium API ------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_single_envs_pass_gymnasiums_env_checker(env_id):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render.*")
        check_env(SINGLE[env_id]())
        check_env(gym.make(env_id).unwrapped)


def test_ids_are_registered_with_single_and_vector_entry_points():
    assert set(ENV_IDS) == {"CartPoleNoVel-v1", "ProductionChain-v0"}
    for env_id in ENV_IDS:
        assert isinstance(gym.make(env_id).unwrapped, SINGLE[env_id])
        venv = gym.make_vec(env_id, 3, vectorization_mode="vector_entry_point")
        assert isinstance(venv, VECTOR[env_id]) and venv.num_envs == 3
        assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert gym.spec("ProductionChain-v0").max_episode_steps == T
    assert gym.spec("CartPoleNoVel-v1").max_episode_steps == 500


def test_make_helpers_accept_ids_with_or_without_version_and_reject_unknown_ones():
    assert isinstance(make_env("CartPoleNoVel"), CartPoleNoVelEnv)
    assert isinstance(make_env("ProductionChain-v0", backlog_capacity=20), ProductionChainEnv)
    venv = make_vec_env("ProductionChain", 4, seed=3)
    assert isinstance(venv, ProductionChainVecEnv) and venv.num_envs == 4
    # The constructor's seed is the seed of the first reset.
    a, _ = venv.reset()
    b, _ = make_vec_env("ProductionChain-v0", 4, seed=3).reset()
    assert np.array_equal(a, b)
    with pytest.raises(ConfigError, match="unknown environment"):
        make_env("Pong-v5")


def test_spaces():
    cp = CartPoleNoVelEnv()
    full = gym.make("CartPole-v1").observation_space
    assert cp.observation_space.shape == (2,) and cp.action_space.n == 2
    assert np.array_equal(cp.observation_space.high, full.high[[0, 2]])
    pc = ProductionChainEnv()
    assert pc.observation_space.shape == (15,) and pc.observation_space.dtype == np.float32
    assert pc.action_space.n == 8
    assert len(observation_names(CFG)) == 15
    venv = ProductionChainVecEnv(5)
    assert venv.observation_space.shape == (5, 15) and venv.action_space.shape == (5,)
    obs, _ = venv.reset(seed=0)
    for _ in range(300):
        obs, *_ = venv.step(np.random.default_rng(0).integers(0, 8, 5))
        assert venv.single_observation_space.contains(obs[0])


@pytest.mark.parametrize("stations, probs", [(2, (0.8, 0.8)), (4, (0.9, 0.8, 0.75, 0.9))])
def test_other_line_lengths_scale_observation_and_actions(stations, probs):
    env = ProductionChainEnv(stations=stations, process_prob=probs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*render.*")
        check_env(env)
    assert env.observation_space.shape == (4 * stations + 3,)
    assert env.action_space.n == 2 * (stations + 1)
    assert len(observation_names(env.config)) == 4 * stations + 3
    # The shared rule works on any line, and still far better than doing nothing.
    h = evaluate(lambda e: HeuristicPolicy(env.config), 20, seed=0, config=env.config)
    assert h.mean() > evaluate(lambda e: NoOpPolicy(), 20, seed=0, config=env.config).mean() + 100


def test_bad_actions_and_steps_before_reset_are_refused():
    venv = ProductionChainVecEnv(2)
    with pytest.raises(RuntimeError, match="reset"):
        venv.step(np.zeros(2, np.int64))
    venv.reset(seed=0)
    for bad in (np.array([0, 8]), np.array([-1, 0]), np.zeros(3, np.int64), np.array([0.5, 1.0])):
        with pytest.raises(ValueError):
            venv.step(bad)
    env = ProductionChainEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError):
        env.step(8)
    for _ in range(T):
        env.step(0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_actions_encode_release_and_maintenance_target():
    release, target = decode_action(np.arange(8))
    assert release.tolist() == [0, 1] * 4
    assert target.tolist() == [-1, -1, 0, 0, 1, 1, 2, 2]
    assert encode_action(release, target).tolist() == list(range(8))


def test_config_is_validated():
    with pytest.raises(ConfigError, match="process_prob"):
        ProductionChainConfig(stations=4)
    with pytest.raises(ConfigError, match="repair_prob"):
        ProductionChainConfig(repair_prob=1.5)
    with pytest.raises(ConfigError, match="episode_length"):
        ProductionChainConfig(episode_length=0)
    with pytest.raises(ConfigError, match="hold_fg"):
        ProductionChainConfig(hold_fg=-1.0)
    assert ProductionChainConfig(stations=4, process_prob=(0.9, 0.8, 0.8, 0.9)).stations == 4


# -- seeding, determinism, single/vector identity ----------------------------------------------


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_and_actions_give_the_same_trajectory(env_id):
    actions = np.random.default_rng(1).integers(0, SINGLE[env_id]().action_space.n, 700)
    a = rollout_single(SINGLE[env_id](), 7, actions)
    b = rollout_single(SINGLE[env_id](), 7, actions)
    c = rollout_single(SINGLE[env_id](), 8, actions)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_vector_instance_i_is_the_single_env_seeded_seed_plus_i(env_id):
    n, seed, steps = 4, 11, 600  # past at least one autoreset of every instance
    venv = VECTOR[env_id](n)
    rng = np.random.default_rng(2)
    actions = rng.integers(0, venv.single_action_space.n, (steps, n))
    obs, _ = venv.reset(seed=seed)
    singles = [SINGLE[env_id]() for _ in range(n)]
    for i, e in enumerate(singles):
        e.reset(seed=seed + i)
    s_ret = np.zeros(n)
    ends = 0
    for t in range(steps):
        obs, reward, term, trunc, info = venv.step(actions[t])
        for i, e in enumerate(singles):
            o, r, te, tr, _ = e.step(actions[t, i])
            s_ret[i] += r
            assert (bool(term[i]), bool(trunc[i])) == (te, tr)
            assert np.float32(r) == reward[i]
            if te or tr:
                ends += 1
                assert info["_final_obs"][i]
                assert np.array_equal(info["final_obs"][i], o)
                assert info["episode_return"][i] == pytest.approx(s_ret[i])
                s_ret[i] = 0.0
                o, _ = e.reset()
            assert np.array_equal(obs[i], o), (t, i)
    assert ends >= n


def test_reset_with_a_seed_restarts_the_stream_and_reset_without_continues_it():
    venv = ProductionChainVecEnv(3)
    a, _ = venv.reset(seed=5)
    b, _ = venv.reset()
    c, _ = venv.reset(seed=5)
    assert np.array_equal(a, c) and not np.array_equal(a, b)
    # Per-instance seeds may also be given one by one.
    d, _ = venv.reset(seed=[5, 6, 7])
    assert np.array_equal(a, d)


def test_cartpole_autoreset_returns_a_fresh_episode_and_the_final_observation():
    venv = CartPoleVecEnv(8)
    venv.reset(seed=0)
    always_left = np.zeros(8, np.int64)
    for t in range(1, 200):  # noqa: B007 - t is read after the loop: the episode length at the break
        obs, reward, term, trunc, info = venv.step(always_left)
        assert (reward == 1.0).all()
        if term.any():
            break
    done = term
    final = info["final_obs"][done]
    assert ((np.abs(final[:, 0]) > 2.4) | (np.abs(final[:, 2]) > 12 * 2 * np.pi / 360)).all()
    assert (np.abs(obs[done]) <= 0.05).all()  # the next episode's first observation
    assert (info["episode_length"][done] == t).all()
    assert (info["episode_return"][done] == t).all()
    assert not info["_final_obs"][~done].any()


def test_production_chain_episodes_are_truncated_at_the_fixed_length_and_never_terminate():
    venv = ProductionChainVecEnv(6, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    for t in range(1, 2 * T + 1):
        _, _, term, trunc, info = venv.step(rng.integers(0, 8, 6))
        assert not term.any()
        assert trunc.all() == (t % T == 0) and trunc.all() == trunc.any()
        if trunc.any():
            assert (info["episode_length"] == T).all()


def test_rewards_stay_in_the_documented_bounds():
    lo, hi = CFG.reward_bounds()
    assert -5.0 <= lo < 0.0 < hi <= 5.0
    for make in (lambda e: RandomPolicy(8, seed=3), lambda e: HeuristicPolicy(CFG),
                 lambda e: NoOpPolicy()):
        venv = ProductionChainVecEnv(64, autoreset=False)
        policy = make(venv)
        obs, _ = venv.reset(seed=0)
        policy.reset(64)
        rewards = []
        for _ in range(T):
            obs, r, *_ = venv.step(policy.act(obs))
            rewards.append(r)
        rewards = np.array(rewards)
        assert lo <= rewards.min() and rewards.max() <= hi
        assert np.abs(rewards).mean() < 2.0  # roughly unit scale, for PPO's defaults


def test_step_work_does_not_grow_with_the_number_of_instances():
    # A Python loop over instances would run 16x as many Python function calls a step for 256
    # instances as for 16; array operations keep them flat. Counted, not timed: the count does
    # not depend on what else the machine is doing.
    import sys

    def calls_per_step(n):
        venv = ProductionChainVecEnv(n, seed=0)
        venv.reset()
        acts = np.random.default_rng(0).integers(0, 8, (50, n))
        count = [0]

        def prof(frame, event, arg):
            if event == "call":
                count[0] += 1
        sys.setprofile(prof)
        try:
            for a in acts:
                venv.step(a)
        finally:
            sys.setprofile(None)
        return count[0] / len(acts)
    small, large = calls_per_step(16), calls_per_step(256)
    assert small > 0 and large < 1.5 * small, (small, large)


# -- CartPole parity with Gymnasium -------------------------------------------------------------


def test_full_state_cartpole_matches_gymnasium_step_for_step():
    ref = gym.make("CartPole-v1")
    mine = CartPoleVecEnv(1, autoreset=False)
    rng = np.random.default_rng(0)
    steps = 0
    for episode in range(12):
        seed = 100 + episode
        o_ref, _ = ref.reset(seed=seed)
        o_mine, _ = mine.reset(seed=seed)
        assert np.array_equal(o_ref, o_mine[0])
        done = False
        while not done:
            # Half balancing, half random: long and short episodes, both terminations.
            a = int(o_ref[2] + 0.5 * o_ref[3] > 0) if rng.random() < 0.7 else int(rng.integers(2))
            o_ref, r_ref, te_ref, tr_ref, _ = ref.step(a)
            o_mine, r_mine, te_mine, tr_mine, _ = mine.step(np.array([a]))
            assert np.array_equal(mine.state[0], ref.unwrapped.state)
            assert np.array_equal(o_ref, o_mine[0])
            assert (r_ref, te_ref, tr_ref) == (r_mine[0], te_mine[0], tr_mine[0])
            done = te_ref or tr_ref
            steps += 1
    assert steps > 1000


def test_cartpole_novel_is_cartpole_v1_without_the_velocities():
    ref = gym.make("CartPole-v1")
    env = CartPoleNoVelEnv()
    rng = np.random.default_rng(1)
    o_ref, _ = ref.reset(seed=3)
    o, _ = env.reset(seed=3)
    for _ in range(2000):
        assert np.array_equal(o, o_ref[[0, 2]])
        a = int(rng.integers(2))
        o_ref, r_ref, te_ref, tr_ref, _ = ref.step(a)
        o, r, te, tr, _ = env.step(a)
        assert (r, te, tr) == (r_ref, te_ref, tr_ref)
        if te or tr:
            o_ref, _ = ref.reset()  # unseeded resets continue the same generator stream
            o, _ = env.reset()


def test_cartpole_novel_needs_memory_to_balance_for_500_steps():
    # A PD controller balances with velocities from differenced observations (memory of one
    # step) and falls within ~40 steps without them.
    def lengths(memory):
        venv = CartPoleNoVelVecEnv(32, autoreset=False)
        obs, _ = venv.reset(seed=0)
        prev, alive, length = obs.copy(), np.ones(32, bool), np.zeros(32)
        for _ in range(500):
            vel = (obs - prev) / 0.02 if memory else np.zeros_like(obs)
            push = obs[:, 1] + 0.5 * vel[:, 1] + 0.05 * obs[:, 0] + 0.1 * vel[:, 0]
            prev = obs
            obs, _, term, trunc, _ = venv.step((push > 0).astype(np.int64))
            length += alive
            alive &= ~(term | trunc)
        return length, trunc
    with_memory, trunc = lengths(True)
    assert (with_memory == 500).all() and trunc.all()
    assert lengths(False)[0].mean() < 100


# -- ProductionChain: partial observability and the baselines ----------------------------------


def test_observation_hides_wear_and_regime_but_history_reveals_them():
    names = observation_names(CFG)
    assert [n for n in names if "wear" in n] == [f"wear_sensor_{k}" for k in range(CFG.stations)]
    assert not [n for n in names if "regime" in n or "demand" in n]
    n = 200
    venv = ProductionChainVecEnv(n, autoreset=False)
    policy = MemoryHeuristicPolicy(CFG)
    obs, _ = venv.reset(seed=1)
    policy.reset(n)
    sensor_err, filter_err, one_step_hits, filter_hits = [], [], [], []
    pi = CFG.p_low_to_high / (CFG.p_low_to_high + CFG.p_high_to_low)
    arrivals = np.arange(CFG.demand_max + 1)
    lo = (1 - pi) * _poisson_pmf(arrivals, CFG.demand_low, CFG.demand_max)
    hi = pi * _poisson_pmf(arrivals, CFG.demand_high, CFG.demand_max)
    for t in range(T):
        hidden = venv.hidden_state()
        o = Observation.parse(obs, CFG)
        up = ~(o.broken | o.maint)
        sensor_err.append((o.sensor - hidden["wear"])[up])
        actions = policy.act(obs)
        # The filter resets its estimate of a station it sends to maintenance; the station's
        # wear is reset by the step that follows, so leave those out.
        sent = decode_action(actions)[1][:, None] == np.arange(CFG.stations)
        filter_err.append((policy.mean - hidden["wear"])[up & ~sent])
        if t:
            # The coming period's regime: the Bayes guess from the last period's arrivals
            # alone, against the HMM filter over all arrivals so far.
            one_step_hits.append((hi > lo)[o.arrivals.astype(np.int64)] == hidden["high_demand"])
            filter_hits.append((policy.p_high > 0.5) == hidden["high_demand"])
        obs, *_ = venv.step(actions)
    rmse = lambda e: float(np.sqrt(np.mean(np.concatenate(e) ** 2)))  # noqa: E731
    # One reading of the sensor is off by its noise; a filter over the history is 4x closer.
    assert rmse(sensor_err) == pytest.approx(CFG.sensor_noise, rel=0.05)
    assert rmse(filter_err) < CFG.sensor_noise / 4
    # One period's arrivals say little about the regime; their history says much more.
    assert np.mean(filter_hits) > np.mean(one_step_hits) + 0.1


@pytest.fixture(scope="module")
def returns():
    """Per-episode returns of every policy on the same 100 seeded episodes (common random
    numbers: the comparisons are paired)."""
    n_actions = ProductionChainEnv().action_space.n
    makers = {
        "random": lambda e: RandomPolicy(n_actions, seed=0),
        "noop": lambda e: NoOpPolicy(),
        "heuristic": lambda e: HeuristicPolicy(CFG),
        "memory": lambda e: MemoryHeuristicPolicy(CFG),
        "oracle": lambda e: OraclePolicy(e),
    }
    return {k: evaluate(m, 100, seed=0, config=CFG) for k, m in makers.items()}


def test_the_heuristic_baseline_is_sensible(returns):
    h = returns["heuristic"]
    assert h.mean() > 0.0
    assert h.mean() > returns["random"].mean() + 100
    assert h.mean() > returns["noop"].mean() + 100


def test_memory_and_full_information_beat_the_memoryless_baseline_by_a_clear_margin(returns):
    h, m, o = returns["heuristic"], returns["memory"], returns["oracle"]
    # docs/production-chain.md reports about +55 % and +90 % on 200 episodes.
    assert m.mean() > 1.3 * h.mean()
    assert o.mean() > 1.5 * h.mean()
    assert o.mean() > m.mean()
    # Paired over the same episodes, the gains are far beyond noise.
    for better in (m, o):
        d = better - h
        assert d.mean() - 3 * d.std(ddof=1) / np.sqrt(len(d)) > 0


def test_policies_are_seeded_so_evaluation_is_reproducible(returns):
    again = evaluate(lambda e: HeuristicPolicy(CFG), 100, seed=0, config=CFG)
    assert np.array_equal(again, returns["heuristic"])
