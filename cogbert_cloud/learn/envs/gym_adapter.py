"""Any Gymnasium environment as the vector environment the trainers step.

The trainers expect what :class:`~cogbert_cloud.learn.envs.vector.NumpyVecEnv` gives: float32
observations ``[N, obs_dim]``, same-step autoreset, and on steps where some episode ended a
dense ``info["final_obs"]`` with ``_final_obs``, ``episode_return`` and ``episode_length``.
:class:`GymVecEnv` puts that face on any Gymnasium vector environment:

* **Observations.** A ``Box`` of any shape is flattened to float32; a ``Discrete`` becomes a
  one-hot vector. Images (a ``uint8`` ``Box`` of rank 3), ``Dict``, ``Tuple``, ``Text``, ``Graph``
  and the other structured spaces raise :class:`UnsupportedSpaceError` with what to do.
* **Actions.** ``Discrete(n, start)`` is the model's ``n`` discrete actions (``start`` added on
  the way in). A one-dimensional ``Box`` is the model's diagonal Gaussian; its bounds go into the
  bundle (``action_bounds``) and the Policy layer squashes samples into them (``docs/training.md``).
* **Vectorisation.** The environment's own ``vector_entry_point`` when it resets in the same
  step (Cogbert's numpy environments do; Gymnasium's ``CartPoleVectorEnv`` resets on the *next*
  step, which would feed the learner a transition that never happened), else Gymnasium's
  ``SyncVectorEnv`` (``vectorization="sync"``, one Python ``step`` per instance) or
  ``AsyncVectorEnv`` (``"async"``, a process per instance: pays off only for slow simulators).
* **Truncation.** ``truncated`` is passed through as Gymnasium defines it (a time limit, not a
  terminal state), so the trainers bootstrap its value from ``final_obs``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from cogbert_cloud.errors import EnvironmentNotFoundError, UnsupportedSpaceError

__all__ = ["GymVecEnv", "import_env_packages", "resolve_env_id", "flat_obs_dim", "action_bounds",
           "VECTORIZATION_MODES"]

VECTORIZATION_MODES = ("auto", "sync", "async")


def import_env_packages(packages: Sequence[str] | str | None) -> None:
    """Import each module (comma-separated or a list): importing it registers its environments."""
    if not packages:
        return
    names = packages.split(",") if isinstance(packages, str) else list(packages)
    for name in (n.strip() for n in names):
        if not name:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise EnvironmentNotFoundError(f"--env-package {name!r} cannot be imported: {e}") from None


def resolve_env_id(env_id: str) -> str:
    """The registered Gymnasium id for ``env_id``.

    ``module:EnvId`` imports ``module`` first (Gymnasium's own convention); ``module:Class``
    where ``Class`` is a ``gymnasium.Env`` subclass of that module registers it under the id
    ``Class`` (no time limit but the class's own) and returns it.
    """
    if ":" in env_id:
        module, _, name = env_id.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise EnvironmentNotFoundError(f"environment {env_id!r}: module {module!r} cannot be imported: "
                                           f"{e}") from None
        if name in gym.registry:
            return name
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and issubclass(cls, gym.Env):
            gym.register(id=name, entry_point=f"{module}:{name}")
            return name
        raise EnvironmentNotFoundError(f"environment {env_id!r}: {module!r} neither registers {name!r} "
                                       "nor defines a gymnasium.Env class of that name")
    if env_id in gym.registry:
        return env_id
    hint = ""
    try:
        gym.spec(env_id)   # accepts an id without its version when exactly one is registered
        return gym.spec(env_id).id
    except gym.error.Error as e:
        hint = f" ({e})"
    raise EnvironmentNotFoundError(
        f"unknown environment {env_id!r}{hint}; pass a registered Gymnasium id (e.g. CartPole-v1), "
        "--env-package MODULE to import the package that registers yours, or MODULE:Class")


def flat_obs_dim(space: spaces.Space, env_id: str = "") -> int:
    """The flattened observation size of ``space``, or :class:`UnsupportedSpaceError`."""
    where = f"environment {env_id!r}: " if env_id else ""
    if isinstance(space, spaces.Box):
        if space.dtype == np.uint8 and len(space.shape) == 3:
            raise UnsupportedSpaceError(f"{where}image observations {space.shape} are not supported: the model "
                                        "is an MLP encoder with an LSTM; extract features (or wrap the env with "
                                        "a feature extractor) to give it a flat Box")
        return int(np.prod(space.shape)) if space.shape else 1
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    raise UnsupportedSpaceError(f"{where}observation space {type(space).__name__} is not supported; the trainer "
                                "takes a Box (flattened) or a Discrete (one-hot). Wrap Dict/Tuple spaces with "
                                "gymnasium.wrappers.FlattenObservation")


def action_bounds(space: spaces.Space, env_id: str = "") -> tuple[str, int, np.ndarray | None, np.ndarray | None]:
    """``(kind, size, low, high)`` of the model's action space for ``space``; ``low``/``high``
    only for a Box whose bounds are all finite."""
    where = f"environment {env_id!r}: " if env_id else ""
    if isinstance(space, spaces.Discrete):
        return "discrete", int(space.n), None, None
    if isinstance(space, spaces.Box):
        if len(space.shape) != 1:
            raise UnsupportedSpaceError(f"{where}Box actions of shape {space.shape} are not supported; "
                                        "flatten them to one dimension")
        low, high = np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)
        finite = np.isfinite(low) & np.isfinite(high)
        if finite.any() and not finite.all():
            raise UnsupportedSpaceError(f"{where}a Box action space bounded in some dimensions only is not "
                                        "supported; rescale it to all-finite or all-infinite bounds")
        if finite.all():
            return "continuous", int(space.shape[0]), low, high
        return "continuous", int(space.shape[0]), None, None
    raise UnsupportedSpaceError(f"{where}action space {type(space).__name__} is not supported; the trainer "
                                "takes Discrete or a one-dimensional Box")


class GymVecEnv:
    """``num_envs`` instances of a Gymnasium environment with the trainers' vector contract."""

    def __init__(self, env_id: str, num_envs: int, seed: int | None = None, *, vectorization: str = "auto",
                 **kwargs: Any) -> None:
        if vectorization not in VECTORIZATION_MODES:
            raise UnsupportedSpaceError(f"vectorization must be one of {VECTORIZATION_MODES}, got {vectorization!r}")
        self.env_id = resolve_env_id(env_id)
        self.num_envs = int(num_envs)
        self._seed = seed
        spec = gym.spec(self.env_id)
        env: gym.vector.VectorEnv | None = None
        how = "async" if vectorization == "async" else "sync"
        if vectorization == "auto" and spec.vector_entry_point is not None:
            candidate = gym.make_vec(self.env_id, self.num_envs, vectorization_mode="vector_entry_point", **kwargs)
            if candidate.metadata.get("autoreset_mode") == AutoresetMode.SAME_STEP:
                env, how = candidate, "vector_entry_point"
            else:
                candidate.close()
        if env is None:
            env = gym.make_vec(self.env_id, self.num_envs, vectorization_mode=how,
                               vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **kwargs)
        self.env = env
        self.vectorization = how
        self._obs_space = env.single_observation_space
        dim = flat_obs_dim(self._obs_space, self.env_id)
        kind, size, self.low, self.high = action_bounds(env.single_action_space, self.env_id)
        self.discrete = kind == "discrete"
        self.single_observation_space = spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.single_action_space: spaces.Space = (spaces.Discrete(size) if self.discrete else
                                                  env.single_action_space)
        self._start = int(env.single_action_space.start) if self.discrete else 0  # type: ignore[attr-defined]
        self._act_shape: tuple[int, ...] = env.single_action_space.shape or ()
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, np.int64)
        self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def _flat(self, obs: Any) -> np.ndarray:
        if isinstance(self._obs_space, spaces.Discrete):
            idx = np.asarray(obs, np.int64) - int(self._obs_space.start)
            return np.eye(int(self._obs_space.n), dtype=np.float32)[idx]
        return np.asarray(obs, np.float32).reshape(self.num_envs, -1)

    def _flat_one(self, obs: Any) -> np.ndarray:
        if isinstance(self._obs_space, spaces.Discrete):
            out = np.zeros(int(self._obs_space.n), np.float32)
            out[int(obs) - int(self._obs_space.start)] = 1.0
            return out
        return np.asarray(obs, np.float32).reshape(-1)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        obs, _ = self.env.reset(seed=self._seed if seed is None else seed, options=options)
        self._seed = None   # later resets continue the generators
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return self._flat(obs), {}

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        a = np.asarray(actions)
        if self.discrete:
            a = a.astype(np.int64).reshape(self.num_envs) + self._start
        else:
            a = a.astype(self.env.single_action_space.dtype).reshape((self.num_envs, *self._act_shape))
        obs, reward, term, trunc, info = self.env.step(a)
        reward = np.asarray(reward, np.float64)
        term, trunc = np.asarray(term, bool), np.asarray(trunc, bool)
        self._returns += reward
        self._lengths += 1
        done = term | trunc
        out: dict[str, Any] = {}
        if done.any():
            final = np.zeros((self.num_envs, self.single_observation_space.shape[0]), np.float32)
            for i in np.flatnonzero(done):
                final[i] = self._flat_one(info["final_obs"][i])
            out = {"final_obs": final, "_final_obs": done, "episode_return": self._returns.copy(),
                   "episode_length": self._lengths.copy()}
            self._returns[done] = 0.0
            self._lengths[done] = 0
        return self._flat(obs), reward.astype(np.float32), term, trunc, out

    def close(self) -> None:
        self.env.close()
