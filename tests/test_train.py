"""The MLX trainers: PPO checkpoints resume exactly; V-trace learns from logged sequences with
the behaviour's log-probabilities (a bandit-like check with a known best action)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from cogbert_cloud.data.dataset import Sequence  # noqa: E402
from cogbert_cloud.data.store import open_store  # noqa: E402
from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer  # noqa: E402
from cogbert_cloud.learn.train.vtrace import VTraceConfig, VTraceTrainer  # noqa: E402
from cogbert_edge import ActionSpace, Bundle, ModelConfig, Policy, init_params  # noqa: E402


def _small(checkpoint_every: int = 0) -> PPOConfig:
    return PPOConfig(env="CartPoleNoVel-v1", num_envs=4, rollout=16, epochs=2, encoder=(16,), hidden=16,
                     seed=3, checkpoint_every=checkpoint_every)


def test_an_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    steps = 4 * 4 * 16
    straight = PPOTrainer(_small(), store=open_store(f"file://{tmp_path / 'a'}"), prefix="run")
    straight.train(steps, progress=False)
    store = open_store(f"file://{tmp_path / 'b'}")
    first = PPOTrainer(_small(checkpoint_every=2), store=store, prefix="run")
    first.train(steps, progress=False)
    # As if the process had died after update 2: the latest checkpoint is that one.
    store.put("run/latest", b"run/checkpoint-000002.npz")
    resumed = PPOTrainer.resume(store, "run")
    assert resumed.update_idx == 2
    resumed.train(steps, progress=False)
    assert resumed.update_idx == straight.update_idx == 4 and resumed.steps == straight.steps
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=0, atol=1e-6, err_msg=k)
    assert any(not np.allclose(first.params[k], PPOTrainer(_small()).params[k]) for k in first.params)


def _logged(bundle: Bundle, n_seq: int, length: int, seed: int) -> list[Sequence]:
    """Sequences logged by ``bundle`` sampling its actions, on observations of noise; action 2
    pays 1, every other action 0."""
    rng = np.random.default_rng(seed)
    policy = Policy(bundle, "numpy", seed=seed)
    out = []
    for i in range(n_seq):
        state = policy.initial_state()
        h0, c0 = np.array(state.h), np.array(state.c)
        obs = rng.standard_normal((length, bundle.config.obs_dim)).astype(np.float32)
        acts, logp, val = [], [], []
        for t in range(length):
            d = policy.act(obs[t], state)
            acts.append(int(d.action)), logp.append(float(d.log_prob)), val.append(float(d.value))
            state = d.state
        acts = np.array(acts)
        done = np.zeros(length, bool)
        done[-1] = True
        out.append(Sequence("dev", f"s{i}", np.arange(length), obs, acts, np.array(logp), np.array(val),
                            (acts == 2).astype(np.float32), done, np.zeros(length, bool), ["m"] * length, h0, c0))
    return out


def test_vtrace_moves_the_policy_towards_the_action_the_logs_show_pays():
    cfg = ModelConfig(obs_dim=4, action=ActionSpace.of_discrete(4), encoder=(16,), hidden=16)
    behaviour = Bundle.create(cfg, init_params(cfg, 0, policy_gain=0.01))
    seqs = _logged(behaviour, 48, 24, seed=1)
    trainer = VTraceTrainer(behaviour, VTraceConfig(lr=3e-3, epochs=30, seed=0, burn_in=2))
    info = trainer.train(seqs, progress=False)
    # The data were logged by the starting policy: importance ratios start at 1.
    assert info["sequences"] == 48 and 0.5 < info["mean_ratio"] < 2.0 and np.isfinite(info["loss"])
    after = trainer.bundle()
    probe = np.random.default_rng(9).standard_normal((1000, 4)).astype(np.float32)

    def p_best(b: Bundle) -> float:
        pol = Policy(b, "numpy")
        d = pol.act_batch(probe, pol.initial_state(len(probe)))   # sampled actions
        return float(np.mean(np.asarray(d.action) == 2))

    assert p_best(behaviour) < 0.35 and p_best(after) > 0.6


def _policy_kl(a: PPOTrainer, b_params: dict, b_norm: dict, obs: np.ndarray) -> float:
    """Mean KL(a || b) of the first decision on ``obs`` (each policy with its own normalisation)."""
    from cogbert_edge.inference.model import NumpyMath, step
    h = np.zeros((len(obs), a.cfg.hidden), np.float32)
    la, *_ = step(NumpyMath({**a.params, **a.norm.as_params()}), a.model, obs, h, h)
    lb, *_ = step(NumpyMath({**b_params, **b_norm}), a.model, obs, h, h)
    pa = np.exp(la - np.logaddexp.reduce(la, axis=-1, keepdims=True))
    lpb = lb - np.logaddexp.reduce(lb, axis=-1, keepdims=True)
    return float((pa * (np.log(pa) - lpb)).sum(-1).mean())


def test_fine_tuning_keeps_the_starting_normalisation_and_ref_kl_keeps_the_policy_near_it():
    start = PPOTrainer(_small())
    start.train(2 * 4 * 16, progress=False)
    norm = start.norm.as_params()
    init = {**start.params, **norm}
    obs = np.random.default_rng(0).standard_normal((64, start.model.obs_dim)).astype(np.float32)
    runs = {}
    for name, kw in {"free": {"ref_kl": 0.0}, "near": {"ref_kl": 50.0},
                     "norm_updates": {"ref_kl": 0.0, "freeze_norm": False}}.items():
        cfg = PPOConfig(**{**_small().__dict__, "lr": 0.02, "epochs": 4, **kw})
        t = PPOTrainer(cfg, init=init)
        t.train(6 * 4 * 16, progress=False)
        runs[name] = t
    for k, v in norm.items():       # frozen by default when fine-tuning ...
        np.testing.assert_allclose(runs["free"].norm.as_params()[k], v, rtol=1e-5, err_msg=k)
    assert any(not np.allclose(runs["norm_updates"].norm.as_params()[k], v, rtol=1e-3)  # ... or not
               for k, v in norm.items())
    free, near = (_policy_kl(runs[n], start.params, norm, obs) for n in ("free", "near"))
    assert near < 0.5 * free, (near, free)


def test_a_resumed_fine_tune_keeps_its_reference_and_its_frozen_normalisation(tmp_path):
    start = PPOTrainer(_small())
    start.train(2 * 4 * 16, progress=False)
    init = {**start.params, **start.norm.as_params()}
    cfg = PPOConfig(**{**_small().__dict__, "ref_kl": 1.0})
    steps = 4 * 4 * 16
    straight = PPOTrainer(cfg, init=init)
    straight.train(steps, progress=False)
    store = open_store(f"file://{tmp_path}")
    first = PPOTrainer(PPOConfig(**{**cfg.__dict__, "checkpoint_every": 2}), store=store, prefix="ft", init=init)
    first.train(steps, progress=False)
    store.put("ft/latest", b"ft/checkpoint-000002.npz")
    resumed = PPOTrainer.resume(store, "ft")
    assert resumed.norm_frozen and resumed.ref_mx is not None
    resumed.train(steps, progress=False)
    for k, v in straight.params.items():
        np.testing.assert_allclose(resumed.params[k], v, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("discrete", [True, False])
def test_the_fused_recurrence_computes_the_sequence_and_its_gradient_as_mlx_autodiff_does(discrete):
    """Every trainer's sequence runs through ``train_sequence``: its values and every parameter's
    gradient (and the initial state's) must be those of differentiating ``model.sequence`` itself,
    across episode starts in the middle of the sequence and from a nonzero state."""
    import mlx.core as mx

    from cogbert_cloud.learn.train._lstm import train_sequence
    from cogbert_edge.inference.backends.mlx_backend import MLXMath
    from cogbert_edge.inference.model import sequence

    act = ActionSpace.of_discrete(5) if discrete else ActionSpace.of_continuous(3)
    cfg = ModelConfig(obs_dim=7, action=act, encoder=(12,), hidden=10)
    params = {k: mx.array(v) for k, v in init_params(cfg, 11).items()}
    rng = np.random.default_rng(5)
    T, B = 9, 4
    obs = mx.array(rng.normal(size=(T, B, 7)).astype(np.float32))
    h0 = mx.array(rng.normal(size=(B, 10)).astype(np.float32))
    c0 = mx.array(rng.normal(size=(B, 10)).astype(np.float32))
    starts = np.zeros((T, B), np.float32)
    starts[3, 1] = starts[0, 2] = starts[6, 0] = 1.0
    starts = mx.array(starts)
    wh = mx.array(rng.normal(size=(T, B, act.size)).astype(np.float32))
    wv = mx.array(rng.normal(size=(T, B)).astype(np.float32))

    def loss(fused):
        def f(p, h, c):
            head, value, hT, cT = (train_sequence(MLXMath(p), cfg, obs, h, c, starts) if fused else
                                   sequence(MLXMath(p), cfg, obs, h, c, starts, mx.stack))
            return (head * wh).sum() + (value * wv).sum() + (mx.tanh(head) ** 2).sum() + hT.sum() + 2 * cT.sum()
        return mx.value_and_grad(f, argnums=(0, 1, 2))(params, h0, c0)

    (v_ref, g_ref), (v_fused, g_fused) = loss(False), loss(True)
    assert abs(float(v_ref) - float(v_fused)) <= 1e-4 * abs(float(v_ref))
    for k in params:
        if k.startswith("obs_norm"):
            continue
        ref, got = np.asarray(g_ref[0][k]), np.asarray(g_fused[0][k])
        assert k == "policy.log_std" or np.abs(ref).max() > 0, k   # the loss reads only the mean
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=k)
    for i in (1, 2):
        np.testing.assert_allclose(np.asarray(g_fused[i]), np.asarray(g_ref[i]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("declared", [None, 4.0])
def test_vtrace_targets_the_value_units_the_starting_bundle_declares(declared):
    """PPO and cloning train the value head on rewards divided by the return scale and record it
    (``x-return-scale``); V-trace continuing from such a bundle must target the same units, or it
    reads a value off by that factor as an advantage. Reward 1 each step at gamma 0: the value
    learns 1 / scale."""
    cfg = ModelConfig(obs_dim=4, action=ActionSpace.of_discrete(4), encoder=(16,), hidden=16)
    extra = {} if declared is None else {"x-return-scale": repr(declared)}
    behaviour = Bundle.create(cfg, init_params(cfg, 0, policy_gain=0.01), extra=extra)
    seqs = _logged(behaviour, 48, 24, seed=1)
    for s in seqs:
        s.reward[:] = 1.0
    trainer = VTraceTrainer(behaviour, VTraceConfig(lr=3e-2, epochs=150, seed=0, burn_in=2, gamma=0.0,
                                                    max_grad_norm=5.0))
    trainer.train(seqs, progress=False)
    after = trainer.bundle()
    pol = Policy(after, "numpy")
    probe = np.random.default_rng(9).standard_normal((500, 4)).astype(np.float32)
    value = float(np.mean(np.asarray(pol.act_batch(probe, pol.initial_state(500)).value)))
    expected = 1.0 / (declared or 1.0)
    assert value == pytest.approx(expected, rel=0.2), value
    assert float(after.extra["x-return-scale"]) == pytest.approx(declared or 1.0)


def test_a_ppo_release_records_its_return_scale_and_a_fine_tune_starts_from_it():
    straight = PPOTrainer(_small())
    straight.train(4 * 16 * 2, progress=False)
    scale = float(straight.bundle().extra["x-return-scale"])
    assert scale == pytest.approx(float(np.sqrt(straight.ret_rms.var[0] + 1e-8))) and scale != 1.0
    fine = PPOTrainer(_small(), init=straight.bundle().fp32_params(), init_return_scale=scale)
    assert float(np.sqrt(fine.ret_rms.var[0])) == pytest.approx(scale)
