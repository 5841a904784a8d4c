"""ProductionLine-v0 and the MARL trainer (MAPPO, IPPO, roles, V-trace from joined logs), at tiny
budgets: these check behaviour and contracts, ``cogbert-bench marl`` measures learning."""

from __future__ import annotations

import numpy as np

# The marl extra (in dev): a missing PettingZoo fails here, loudly, rather than skipping.
import pettingzoo
import pytest

from cogbert_cloud.learn.envs.production_line import (
    IDLE,
    MAINTAIN,
    WORK,
    HeuristicTeamPolicy,
    ProductionLineConfig,
    ProductionLineParallelEnv,
    ProductionLineVecEnv,
    RandomTeamPolicy,
    evaluate_team,
    resolve_claims,
)
from cogbert_cloud.learn.marl import MARLTrainer, evaluate_bundles, make_marl_env, marl_preset
from cogbert_cloud.learn.marl.join import JointEpisode
from cogbert_edge import Policy
from cogbert_edge.errors import ConfigError

# -- the environment --------------------------------------------------------------------------------


def test_the_line_passes_pettingzoos_parallel_api_test():
    from pettingzoo.test import parallel_api_test
    env = ProductionLineParallelEnv()
    assert isinstance(env, pettingzoo.ParallelEnv)
    parallel_api_test(env, num_cycles=200)
    obs, _ = env.reset(seed=3)
    assert set(obs) == {"station_0", "station_1", "station_2"} and obs["station_0"].shape == (9,)
    assert env.state().shape == (28,)


def test_the_parallel_env_and_the_vector_env_are_one_implementation():
    pe = ProductionLineParallelEnv()
    ve = ProductionLineVecEnv(1)
    obs, _ = pe.reset(seed=7)
    vobs, _ = ve.reset(seed=7)
    rng = np.random.default_rng(0)
    for _ in range(128):
        a = rng.integers(0, 3, size=3)
        obs, rew, _, trunc, infos = pe.step({f"station_{k}": int(a[k]) for k in range(3)})
        vobs, _, vr, vcost, vdone, _ = ve.step(a[None])
        np.testing.assert_array_equal(np.stack([obs[f"station_{k}"] for k in range(3)]), vobs[0])
        assert rew["station_0"] == pytest.approx(vr[0]) and rew["station_2"] == rew["station_0"]
        assert [infos[f"station_{k}"]["cost"] for k in range(3)] == pytest.approx(vcost[0].tolist())
    assert all(trunc.values()) and vdone[0] and pe.agents == []


def test_seeding_gives_common_random_numbers_and_instances_match_single_runs():
    a, b = ProductionLineVecEnv(4), ProductionLineVecEnv(1)
    a.reset(seed=10)
    b.reset(seed=12)
    rng = np.random.default_rng(1)
    for _ in range(50):
        act = rng.integers(0, 3, size=(4, 3))
        oa, _, ra, *_ = a.step(act)
        ob, _, rb, *_ = b.step(act[2:3])
        np.testing.assert_array_equal(oa[2], ob[0])
        assert ra[2] == rb[0]
    r1 = evaluate_team(HeuristicTeamPolicy(ProductionLineConfig()), 8, 5)
    r2 = evaluate_team(HeuristicTeamPolicy(ProductionLineConfig()), 8, 5)
    np.testing.assert_array_equal(r1, r2)


def test_observations_are_local_and_the_crew_is_shared():
    env = ProductionLineVecEnv(1)
    obs, state = env.reset(seed=1)
    assert obs.shape == (1, 3, 9) and state.shape == (1, 28)
    np.testing.assert_array_equal(state[0, :27], obs[0].ravel())
    assert (obs[0, :2, 6:8] == 0).all(), "only the last station sees demand"
    # Everyone claims the one crew at once: one claim is served, the others are denied and counted.
    obs, _, _, cost, _, info = env.step(np.full((1, 3), MAINTAIN))
    assert info["granted"].sum() == 1 and info["denied"].sum() == 2 and info["conflicts"] == 1
    assert obs[0, :, 5].tolist() == [0.0, 0.0, 0.0]        # the crew is busy, every station sees it
    assert obs[0, info["denied"][0], 8].tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError):
        env.step(np.full((1, 3), 3))
    with pytest.raises(ConfigError):
        env.step(np.zeros((1, 2), np.int64))


def test_resolve_claims_highest_sensor_first_ties_to_the_lower_index():
    claims = np.array([[True, True, True], [True, False, True], [False, False, False]])
    sensor = np.array([[0.5, 0.9, 0.9], [2.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
    g = resolve_claims(claims, sensor, np.array([1, 1, 1]))
    assert g.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert resolve_claims(claims, sensor, np.array([2, 0, 1]))[:2].tolist() == [[False, True, True],
                                                                                [False, False, False]]


def test_the_heuristic_is_a_real_baseline():
    cfg = ProductionLineConfig()
    h = evaluate_team(HeuristicTeamPolicy(cfg), 100, 0)
    r = evaluate_team(RandomTeamPolicy(cfg), 100, 0)
    idle = evaluate_team(type("Idle", (), {"act": lambda self, o: np.full(o.shape[:2], IDLE)})(), 100, 0)
    work = evaluate_team(type("Work", (), {"act": lambda self, o: np.full(o.shape[:2], WORK)})(), 100, 0)
    assert h.mean() > max(r.mean(), idle.mean(), work.mean()) + 5


# -- the trainer --------------------------------------------------------------------------------------


def _tiny(env: str = "ProductionLine-v0", **kw) -> MARLTrainer:
    base = dict(num_envs=4, rollout=32, epochs=1, minibatches=1, encoder=(16,), hidden=16)
    base.update(kw)
    return MARLTrainer(marl_preset(env, **base))


def test_mappo_and_ippo_train_and_export_device_bundles():
    for critic in ("central", "local"):
        t = _tiny(critic=critic)
        before = {k: v.copy() for k, v in t.params["actor/agent"].items()}
        run = t.train(2 * 4 * 32)
        assert run["updates"] == 2 and len(t.curve) == 2
        assert any(not np.array_equal(before[k], t.params["actor/agent"][k]) for k in before)
        assert ("critic" in t.params) == (critic == "central")
        bundles = t.bundles()
        assert list(bundles) == ["agent"]
        b = bundles["agent"]
        assert b.config.obs_dim == 9 + 3 and b.extra["x-marl-role"] == "agent"
        assert b.extra["x-marl-algorithm"] == ("mappo" if critic == "central" else "ippo")
        # The bundle is what a device runs: the Policy API decides on local obs + one-hot id.
        p = Policy(b, "numpy", seed=0)
        d = p.act(np.zeros(12, np.float32), p.initial_state())
        assert 0 <= d.action < 3
        r = evaluate_bundles(bundles, t.role_map(), "ProductionLine-v0", 4, seed=99)
        assert r.shape == (4,) and np.isfinite(r).all()


def test_heterogeneous_roles_have_one_actor_each():
    t = _tiny(roles="per_agent")
    t.train(4 * 32)
    assert sorted(t.bundles()) == ["station_0", "station_1", "station_2"]
    t = _tiny(roles=["head", "body", "body"])
    assert sorted(t.bundles()) == ["body", "head"]
    assert t.bundles()["body"].extra["x-marl-agents"] == "station_1,station_2"
    with pytest.raises(ConfigError):
        _tiny(roles=["a", "b"])
    with pytest.raises(ConfigError):
        _tiny(critic="both")


def test_any_pettingzoo_parallel_env_trains_simple_spread():
    env = make_marl_env("mpe2:simple_spread_v3", 2, 0)
    assert (env.n_agents, env.obs_dim, env.state_dim, env.n_actions) == (3, 18, 54, 5)
    t = _tiny("mpe2:simple_spread_v3", num_envs=2, rollout=25)
    t.train(2 * 25 * 2)
    assert len(t.episode_returns) >= 2 and all(r < 0 for r in t.episode_returns)
    r = evaluate_bundles(t.bundles(), t.role_map(), "mpe2:simple_spread_v3", 2, seed=5)
    assert r.shape == (2,) and (r < 0).all()
    with pytest.raises(ConfigError):
        make_marl_env("nosuch", 1)


def _joined_episodes(t: MARLTrainer, n: int, seed: int) -> list[JointEpisode]:
    """What join_site returns for a site whose devices ran ``t``'s bundles (see test_site_experience)."""
    bundles, roles = t.bundles(), t.role_map()
    env = ProductionLineVecEnv(n, config=ProductionLineConfig(episode_length=32))
    policies = {r: Policy(b, "numpy", seed=seed) for r, b in bundles.items()}
    state = policies["agent"].initial_state(3 * n)
    obs, st = env.reset(seed)
    rows = []
    for _ in range(32):
        from cogbert_edge.site.agent import actor_input
        x = actor_input(obs, np.arange(3), 3).reshape(3 * n, -1)
        d = policies["agent"].act_batch(x, state)
        state = d.state
        a = np.asarray(d.action).reshape(n, 3)
        nobs, nst, r, _, done, _ = env.step(a)
        rows.append((obs, st, a, np.asarray(d.log_prob).reshape(n, 3), r, done))
        obs, st = nobs, nst
    assert set(roles.values()) == {"agent"}
    out = []
    for i in range(n):
        out.append(JointEpisode(
            site="s", session=f"ep{i}", steps=np.arange(32), obs=np.stack([r[0][i] for r in rows]),
            actions=np.stack([r[2][i] for r in rows]), log_prob=np.stack([r[3][i] for r in rows]),
            reward=np.stack([np.repeat(r[4][i], 3) for r in rows]), done=np.array([r[5][i] for r in rows]),
            state=np.stack([r[1][i] for r in rows]), models=[["m"] * 3] * 32))
    return out


def test_vtrace_finetuning_from_joined_logs_corrects_each_agents_own_actions():
    t = _tiny(num_envs=4, rollout=32)
    t.train(4 * 32)
    eps = _joined_episodes(t, 4, seed=3)
    # On-policy logs: every agent's ratio is 1 (its own log-probability, recomputed by the learner).
    before = {k: v.copy() for k, v in t.params["actor/agent"].items()}
    info = t.finetune_vtrace(eps, epochs=1)
    assert info["max_abs_log_rho"] < 1e-4 and info["rho_clipped_frac"] == 0.0
    assert info["joint_steps"] == 4 * 32 and np.isfinite(info["loss"])
    assert any(not np.array_equal(before[k], t.params["actor/agent"][k]) for k in before)
    # Logs from another policy: the ratios leave 1 (E[rho] stays 1) and those above rho_bar are clipped.
    other = _tiny(seed=11)
    info2 = other.finetune_vtrace(eps, epochs=1, rho_bar=1.0)
    assert info2["max_abs_log_rho"] > 0.01 and info2["rho_clipped_frac"] > 0.05
    with pytest.raises(ConfigError):
        t.finetune_vtrace([])
