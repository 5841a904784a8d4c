"""Training on any Gymnasium environment through ``cogbert cloud train``: standard ids with
discrete and continuous actions, a user's own package outside the repository, hyperparameter
files and overrides, progress off a terminal, the learning-curve plot, typed errors for spaces
the trainer cannot take, and the squashed continuous bounds the Policy applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("gymnasium")

import gymnasium as gym  # noqa: E402

from cogbert_cloud.errors import EnvironmentNotFoundError, UnsupportedSpaceError  # noqa: E402
from cogbert_cloud.learn.envs import GymVecEnv, make_vec_env  # noqa: E402
from cogbert_cloud.learn.train.config import resolve  # noqa: E402
from cogbert_cloud.learn.train.ppo import PPOConfig  # noqa: E402
from cogbert_edge import Policy, load_bundle  # noqa: E402
from cogbert_edge.errors import ConfigError  # noqa: E402
from cogbert_edge.inference.bounds import ActionBounds  # noqa: E402
from cogbert_edge.inference.model import LOG_2PI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hp", "epochs=2", "--hp", "encoder=[16]", "--hp", "hidden=16", "--eval-episodes", "2"]


def _train(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cogbert_cloud.cli", "cloud", "train", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _backends() -> list[str]:
    from cogbert_edge.inference.backends import available_backends
    return [b for b in ("numpy", "native") if b in available_backends()]


def test_cartpole_v1_trains_and_exports_a_bundle_a_policy_runs(tmp_path):
    summary, proc = _train(tmp_path, "--env", "CartPole-v1", "--steps", "2048", *SMALL)
    assert summary["env"] == "CartPole-v1" and summary["steps"] == 2048
    bundle = load_bundle(tmp_path / "run" / "model.safetensors")
    assert bundle.config.action.kind == "discrete" and bundle.config.obs_dim == 4
    record = json.loads(bundle.extra["x-train-config"])
    assert record["config"]["epochs"] == 2 and record["config"]["encoder"] == [16]
    # Off a terminal, progress is structured log lines on stderr, not silence.
    assert "train_progress" in proc.stderr
    env = gym.make("CartPole-v1")
    for backend in _backends():
        policy = Policy(bundle, backend, seed=0)
        obs, _ = env.reset(seed=1)
        state = policy.initial_state()
        for _ in range(20):
            d = policy.act(obs, state)
            assert d.action in (0, 1) and d.log_prob <= 0.0
            obs, _, term, trunc, _ = env.step(d.action)
            state = d.state
            if term or trunc:
                break


def test_pendulum_v1_trains_with_bounded_continuous_actions(tmp_path):
    summary, _ = _train(tmp_path, "--env", "Pendulum-v1", "--steps", "2048", "--hp", "rollout=64", *SMALL)
    assert summary["export"]["action_agreement"] > 0.9
    bundle = load_bundle(tmp_path / "run" / "model.safetensors")
    assert bundle.config.action.kind == "continuous" and bundle.config.action.size == 1
    bounds = ActionBounds.from_extra(bundle.extra, 1)
    assert bounds is not None and bounds.low.tolist() == [-2.0] and bounds.high.tolist() == [2.0]
    obs = np.array([0.1, 0.9, -0.3], np.float32)
    for backend in _backends():
        policy = Policy(bundle, backend, seed=0)
        head, _, _ = policy.step(obs[None], policy.initial_state(1))
        d = policy.act_batch(np.repeat(obs[None], 4096, 0), policy.initial_state(4096))
        a = np.asarray(d.action)
        assert a.shape == (4096, 1) and (a > -2.0).all() and (a < 2.0).all()
        # The reported log-probability is the density of the applied (squashed) action.
        u = np.arctanh(np.clip(a / 2.0, -1 + 1e-7, 1 - 1e-7))
        std = np.exp(bundle.tensors["policy.log_std"])
        gauss = (-0.5 * ((u - head) / std) ** 2 - np.log(std) - 0.5 * LOG_2PI).sum(-1)
        expected = gauss - (np.log(2.0 * (1 - np.tanh(u) ** 2))).sum(-1)
        np.testing.assert_allclose(np.asarray(d.log_prob), expected, rtol=1e-3, atol=2e-3)
        greedy = policy.act(obs, policy.initial_state(), deterministic=True)
        np.testing.assert_allclose(greedy.action, 2.0 * np.tanh(head[0]), rtol=1e-5, atol=1e-6)


def test_the_squashed_density_integrates_to_one():
    # The change of variables is right only if p(a) integrates to 1 over [low, high].
    b = ActionBounds(np.array([-1.0]), np.array([3.0]))
    a = np.linspace(-1 + 1e-6, 3 - 1e-6, 200_001)[:, None]
    u = b.unsquash(a).astype(np.float64)
    mean, std = 0.7, 0.8
    gauss = (-0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * LOG_2PI).sum(-1)
    density = np.exp(gauss - b.log_det(u))
    assert abs(np.trapezoid(density, a[:, 0]) - 1.0) < 1e-3


def test_a_user_package_outside_the_repository_registers_and_trains_its_env(tmp_path):
    pkg = tmp_path / "userpkg" / "myplant"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        import gymnasium as gym
        import numpy as np
        from gymnasium import spaces

        class Valve(gym.Env):
            """Keep a level near a target that the observation hides every other step."""
            def __init__(self, target=0.5):
                self.observation_space = spaces.Box(-5, 5, (2, 1), np.float32)   # 2-D: flattened
                self.action_space = spaces.Discrete(3, start=-1)                 # start: shifted
                self.target = float(target)
            def reset(self, *, seed=None, options=None):
                super().reset(seed=seed)
                self.level, self.t = float(self.np_random.uniform(-1, 1)), 0
                return self._obs(), {}
            def _obs(self):
                return np.array([[self.level], [self.target]], np.float32)
            def step(self, action):
                assert action in (-1, 0, 1), action
                self.level += 0.1 * int(action)
                self.t += 1
                return self._obs(), -abs(self.level - self.target), False, self.t >= 50, {}

        gym.register("MyPlant/Valve-v0", entry_point="myplant:Valve", max_episode_steps=50)
    '''))
    summary, _ = _train(tmp_path, "--env", "MyPlant/Valve-v0", "--env-package", "myplant",
                        "--env-kwargs", "target=0.25", "--steps", "1024", *SMALL,
                        env={"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path / 'userpkg'}"})
    assert summary["env"] == "MyPlant/Valve-v0" and summary["steps"] == 1024
    record = json.loads(load_bundle(tmp_path / "run" / "model.safetensors").extra["x-train-config"])
    assert record["config"]["env_kwargs"] == {"target": 0.25}
    saved = (tmp_path / "run" / "config.yml").read_text()
    assert "target: 0.25" in saved
    # The run's saved config.yml is a flat file that --config accepts.
    cfg, sources = resolve(PPOConfig, "ppo", "MyPlant/Valve-v0", config_file=tmp_path / "run" / "config.yml")
    assert cfg.epochs == 2 and cfg.encoder == (16,) and sources[-1].endswith("config.yml")


def test_config_files_and_overrides_resolve_in_order_and_reject_unknown_keys(tmp_path):
    f = tmp_path / "ppo.yml"
    f.write_text("default:\n  epochs: 3\nCartPole-v1:\n  lr: 0.002\n  encoder: [32, 32]\n")
    cfg, _ = resolve(PPOConfig, "ppo", "CartPole-v1", config_file=f, hp={"lr": 0.005}, flags={"seed": 4})
    assert (cfg.epochs, cfg.lr, cfg.encoder, cfg.seed) == (3, 0.005, (32, 32), 4)
    cfg, _ = resolve(PPOConfig, "ppo", "Acrobot-v1", config_file=f)
    assert cfg.epochs == 3 and cfg.lr == 1e-3   # the shipped Acrobot entry, then the file's default
    with pytest.raises(ConfigError, match="unknown ppo hyperparameter.*learning_rate"):
        resolve(PPOConfig, "ppo", "CartPole-v1", hp={"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="epochs"):
        resolve(PPOConfig, "ppo", "CartPole-v1", hp={"epochs": "many"})


def test_spaces_the_trainer_cannot_take_raise_typed_errors():
    class Obs(gym.Env):
        def __init__(self, space):
            self.observation_space, self.action_space = space, gym.spaces.Discrete(2)

    class Act(gym.Env):
        def __init__(self, space):
            self.observation_space, self.action_space = gym.spaces.Box(-1, 1, (2,)), space

    gym.register("CogbertTest/Obs-v0", entry_point=Obs)  # type: ignore[arg-type]
    gym.register("CogbertTest/Act-v0", entry_point=Act)  # type: ignore[arg-type]
    bad_obs = {"image": gym.spaces.Box(0, 255, (32, 32, 3), np.uint8),
               "Dict": gym.spaces.Dict({"a": gym.spaces.Box(-1, 1, (2,))}), "Text": gym.spaces.Text(5)}
    for name, space in bad_obs.items():
        with pytest.raises(UnsupportedSpaceError, match=name if name != "image" else "image"):
            GymVecEnv("CogbertTest/Obs-v0", 1, space=space)
    with pytest.raises(UnsupportedSpaceError, match="MultiDiscrete"):
        GymVecEnv("CogbertTest/Act-v0", 1, space=gym.spaces.MultiDiscrete([2, 3]))
    with pytest.raises(UnsupportedSpaceError, match="shape"):
        GymVecEnv("CogbertTest/Act-v0", 1, space=gym.spaces.Box(-1, 1, (2, 2)))
    with pytest.raises(EnvironmentNotFoundError, match="--env-package"):
        make_vec_env("NoSuchEnv-v7", 1)
    with pytest.raises(EnvironmentNotFoundError, match="cannot be imported"):
        make_vec_env("no_such_module_xyz:Env", 1)


def test_truncation_is_reported_with_the_final_observation_to_bootstrap_from():
    env = make_vec_env("Pendulum-v1", 3, seed=0)
    assert isinstance(env, GymVecEnv) and env.vectorization == "sync"
    obs, _ = env.reset(seed=0)
    for t in range(200):
        obs, r, term, trunc, info = env.step(np.zeros((3, 1), np.float32))
        if t < 199:
            assert not trunc.any() and not info
    assert trunc.all() and not term.any()
    assert info["final_obs"].shape == (3, 3) and info["_final_obs"].all()
    assert info["episode_length"].tolist() == [200, 200, 200]
    # Same-step autoreset: the returned observation starts the next episode, not the final one.
    assert not np.allclose(obs, info["final_obs"])


def test_plot_draws_the_learning_curve(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"steps": 256 * i, "episode_return": float(i), "loss": 1.0 / i} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    proc = subprocess.run([sys.executable, "-m", "cogbert_cloud.cli", "cloud", "plot", str(run)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    png = run / "learning-curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "cogbert_cloud.cli", "cloud", "plot", str(empty)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "metrics.jsonl" in proc.stderr
