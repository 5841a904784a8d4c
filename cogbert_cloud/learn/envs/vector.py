"""The vectorised environment form every Cogbert simulator shares, and its one-instance view.

:class:`NumpyVecEnv` steps ``num_envs`` instances with numpy array operations over all of them
at once. Subclasses write the dynamics (``_reset_rows`` and ``_step``); this class owns the
Gymnasium 1.x vector API around them:

* **Same-step autoreset.** When an instance's episode ends (terminated or truncated) at a
  ``step``, that same call resets it: the returned observation row is the first observation
  of its next episode, the reward and done flags are those of the step that ended the
  episode, and ``info["final_obs"]`` holds the last observation of the ended episode (the
  one to bootstrap a truncated episode's value from). ``metadata["autoreset_mode"]`` says so.
* **Info.** Only on steps where some episode ended does ``info`` hold anything:
  ``final_obs [N, obs_dim]`` (float32), ``episode_return [N]`` (float64, undiscounted, reward
  as returned), ``episode_length [N]`` (int64), each valid where the boolean mask
  ``_final_obs [N]`` is set. Unlike Gymnasium's ``SyncVectorEnv`` (an object array),
  ``final_obs`` is one dense array, so a trainer can evaluate it in one batch.
* **Seeding.** Instance ``i`` draws all its randomness from its own generator, seeded with
  ``seed + i`` (Gymnasium's convention for vector environments), so it behaves exactly like
  the single environment seeded with ``seed + i``, whatever ``num_envs`` is.

:class:`SingleEnv` is the ``gymnasium.Env`` of one instance: a vector core of one, with
autoreset off, drawing from the ``gymnasium.Env``'s own ``np_random``. Single and vector
environments are one implementation, and tests hold them to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

__all__ = ["NumpyVecEnv", "SingleEnv"]


class NumpyVecEnv(VectorEnv):
    """Base of the numpy vector environments (see the module docstring for the contract).

    Subclasses set ``single_observation_space`` / ``single_action_space`` through
    ``_init_spaces`` and implement:

    * ``_reset_rows(rows)``: start new episodes for the instances ``rows`` (an int array),
      drawing from ``self._rngs[i]``, writing their first observations into ``self._obs``;
    * ``_step(actions)``: advance every instance; return ``(reward, terminated, truncated)``
      with the new observations written into ``self._obs``.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(self, num_envs: int, seed: int | None = None, *, autoreset: bool = True) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)
        self.autoreset = autoreset
        self._seed = seed
        self._rngs: list[np.random.Generator] = []
        self._obs = np.zeros((0, 0), np.float32)
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, np.int64)
        self._started = False

    def _init_spaces(self, obs_space: spaces.Box, action_space: spaces.Discrete) -> None:
        self.single_observation_space = obs_space
        self.single_action_space = action_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.action_space = batch_space(action_space, self.num_envs)
        self._n_actions = int(action_space.n)
        self._obs = np.zeros((self.num_envs, obs_space.shape[0]), np.float32)

    # -- Gymnasium API ---------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode in every instance.

        ``seed`` (an int: instance ``i`` gets ``seed + i``; or one seed per instance) reseeds
        the generators; without it, the generators continue, or on the first reset are
        seeded from the constructor's ``seed`` (OS entropy if that is None as well).
        """
        if seed is not None:
            self.set_rngs(_generators(seed, self.num_envs))
        elif not self._rngs:
            self.set_rngs(_generators(self._seed, self.num_envs))
        self._reset_rows(np.arange(self.num_envs))
        self._returns[:] = 0.0
        self._lengths[:] = 0
        self._started = True
        return self._obs.copy(), {}

    def set_rngs(self, rngs: Sequence[np.random.Generator]) -> None:
        """Use these generators, one per instance (they are used, not copied)."""
        if len(rngs) != self.num_envs:
            raise ValueError(f"need {self.num_envs} generators, got {len(rngs)}")
        self._rngs = list(rngs)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          dict[str, Any]]:
        if not self._started:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or a.dtype.kind not in "iu":
            a = _as_actions(a, self.num_envs)
        if a.min() < 0 or a.max() >= self._n_actions:
            raise ValueError(f"actions must be in [0, {self._n_actions}), got {a}")
        reward, terminated, truncated = self._step(a)
        self._returns += reward
        self._lengths += 1
        done = terminated | truncated
        info: dict[str, Any] = {}
        if done.any():
            info = {"final_obs": self._obs.copy(), "_final_obs": done,
                    "episode_return": self._returns.copy(), "episode_length": self._lengths.copy()}
            if self.autoreset:
                self._reset_rows(np.flatnonzero(done))
                self._returns[done] = 0.0
                self._lengths[done] = 0
        return self._obs.copy(), reward.astype(np.float32), terminated, truncated, info

    # -- to implement ----------------------------------------------------------------------

    def _reset_rows(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class SingleEnv(gym.Env):
    """One instance of a :class:`NumpyVecEnv` as a ``gymnasium.Env``.

    The core is built with ``num_envs=1`` and no autoreset; it draws from this environment's
    ``np_random``, so ``reset(seed=s)`` gives the trajectory of instance ``i`` of a vector
    environment reset with ``seed=s - i``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, core: NumpyVecEnv) -> None:
        if core.num_envs != 1 or core.autoreset:
            raise ValueError("the core of a SingleEnv has one instance and no autoreset")
        self.core = core
        self.observation_space = core.single_observation_space
        self.action_space = core.single_action_space

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.core.set_rngs([self.np_random])
        self.core._reset_rows(np.zeros(1, np.int64))
        self.core._started = True
        self._done = False
        return self.core._obs[0].copy(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.core._started:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset()")
        a = int(action)
        if not 0 <= a < self.core._n_actions:
            raise ValueError(f"action must be in [0, {self.core._n_actions}), got {action!r}")
        reward, terminated, truncated = self.core._step(np.array([a]))
        self._done = bool(terminated[0] or truncated[0])
        return (self.core._obs[0].copy(), float(reward[0]), bool(terminated[0]),
                bool(truncated[0]), {})


def _generators(seed: int | Sequence[int] | None, n: int) -> list[np.random.Generator]:
    if seed is None:
        return [np.random.default_rng() for _ in range(n)]
    if isinstance(seed, (int, np.integer)):
        return [np.random.default_rng(int(seed) + i) for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n:
        raise ValueError(f"need {n} seeds, got {len(seeds)}")
    return [np.random.default_rng(int(s)) for s in seeds]


def _as_actions(a: np.ndarray, n: int) -> np.ndarray:
    if a.shape != (n,):
        raise ValueError(f"actions must have shape ({n},), got {a.shape}")
    if a.dtype.kind == "f" and np.all(a == np.round(a)):
        return a.astype(np.int64)
    raise ValueError(f"actions must be integers, got dtype {a.dtype}")
