"""Multi-agent vector environments for the MARL trainer: one interface over ``ProductionLine-v0``
and over any PettingZoo Parallel environment.

The interface (:class:`MultiAgentVecEnv`): ``num_envs`` instances of an environment with
``n_agents`` agents, each with an ``obs_dim`` local observation and ``n_actions`` discrete
actions, and a global ``state_dim`` state:

* ``reset(seed) -> (obs [N, A, obs_dim], state [N, state_dim])``;
* ``step(actions [N, A]) -> (obs, state, rewards [N, A], dones [N], info)``; an instance whose
  episode ended is reset in the same call (the returned rows start its next episode) and
  ``info["episode_return"]`` ``[N, A]`` holds the ended episodes' per-agent returns where
  ``info["ended"]`` is set.

A PettingZoo environment's agents are ordered as ``possible_agents``; agents with different
observation sizes are zero-padded to the largest (the agent id in the actor's input tells
them apart); its ``state()`` is the global state when it has one, else the concatenated
observations. Only environments whose agents all live the whole episode are supported (every
cooperative benchmark the trainer targets, and the production line): an agent that leaves early
raises :class:`~cogbert_edge.errors.ConfigError`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from cogbert_cloud.learn.envs.production_line import ProductionLineConfig, ProductionLineVecEnv
from cogbert_edge.errors import ConfigError

__all__ = ["MultiAgentVecEnv", "LineVecEnv", "PettingZooVecEnv", "make_marl_env", "MARL_ENVS"]


class MultiAgentVecEnv(Protocol):
    num_envs: int
    n_agents: int
    obs_dim: int
    state_dim: int
    n_actions: int
    agents: list[str]

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]: ...


class LineVecEnv:
    """``ProductionLine-v0`` for the trainer: the team reward given to every agent, autoreset."""

    def __init__(self, num_envs: int, seed: int = 0, config: ProductionLineConfig | None = None,
                 **overrides: Any) -> None:
        self.core = ProductionLineVecEnv(num_envs, seed, config=config, **overrides)
        self.config = self.core.config
        c = self.core
        self.num_envs, self.n_agents, self.obs_dim = c.num_envs, c.n_agents, c.obs_dim
        self.state_dim, self.n_actions, self.agents = c.state_dim, c.n_actions, list(c.agents)
        self.episode_length = c.episode_length
        self._ret = np.zeros((num_envs, self.n_agents))
        self._seed = seed

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._ret[:] = 0.0
        return self.core.reset(self._seed if seed is None else seed)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        obs, state, reward, cost, dones, info = self.core.step(np.asarray(actions, np.int64))
        rewards = np.repeat(reward[:, None], self.n_agents, axis=1)
        self._ret += rewards
        out = {"ended": dones.copy(), "cost": cost, "conflicts": info["conflicts"]}
        if dones.all():  # lockstep: every line ends together
            out["episode_return"] = self._ret.copy()
            self._ret[:] = 0.0
            obs, state = self.core.reset()
        return obs, state, rewards, dones, out


class PettingZooVecEnv:
    """``num_envs`` copies of a PettingZoo Parallel environment, stepped one after another."""

    def __init__(self, make: Callable[[], Any], num_envs: int, seed: int = 0) -> None:
        self.envs = [make() for _ in range(num_envs)]
        e = self.envs[0]
        self.num_envs = num_envs
        self.agents = list(e.possible_agents)
        self.n_agents = len(self.agents)
        spaces = [e.action_space(a) for a in self.agents]
        if not all(hasattr(s, "n") for s in spaces) or len({int(s.n) for s in spaces}) != 1:
            raise ConfigError("the MARL trainer needs every agent to have the same Discrete action space")
        self.n_actions = int(spaces[0].n)
        self._dims = [int(np.prod(e.observation_space(a).shape)) for a in self.agents]
        self.obs_dim = max(self._dims)
        self._seed = seed
        self._episodes = 0
        self._has_state = hasattr(e, "state_space") or hasattr(type(e), "state")
        obs, _ = self._reset_one(0, seed)
        self.state_dim = int(self._state(0, obs).shape[0])
        self._obs = np.zeros((num_envs, self.n_agents, self.obs_dim), np.float32)
        self._ret = np.zeros((num_envs, self.n_agents))

    def _reset_one(self, i: int, seed: int) -> tuple[dict, dict]:
        return self.envs[i].reset(seed=seed)

    def _pack(self, obs: dict) -> np.ndarray:
        row = np.zeros((self.n_agents, self.obs_dim), np.float32)
        for k, a in enumerate(self.agents):
            row[k, :self._dims[k]] = np.asarray(obs[a], np.float32).ravel()
        return row

    def _state(self, i: int, obs: dict) -> np.ndarray:
        try:
            return np.asarray(self.envs[i].state(), np.float32).ravel()
        except (AttributeError, NotImplementedError):
            return self._pack(obs).ravel()

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        base = self._seed if seed is None else seed
        states = []
        for i in range(self.num_envs):
            obs, _ = self._reset_one(i, base + i)
            self._obs[i] = self._pack(obs)
            states.append(self._state(i, obs))
        self._episodes = 1
        self._ret[:] = 0.0
        return self._obs.copy(), np.stack(states)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        N, A = self.num_envs, self.n_agents
        rewards = np.zeros((N, A))
        dones = np.zeros(N, bool)
        ended_ret = np.zeros((N, A))
        states = []
        for i, env in enumerate(self.envs):
            act = {a: int(actions[i, k]) for k, a in enumerate(self.agents)}
            obs, rew, term, trunc, _ = env.step(act)
            for k, a in enumerate(self.agents):
                rewards[i, k] = float(rew.get(a, 0.0))
            over = [a for a in self.agents if term.get(a, False) or trunc.get(a, False)]
            if over and len(over) != A:
                raise ConfigError("an agent left the episode before the others: not supported by the trainer")
            self._ret[i] += rewards[i]
            if over:
                dones[i] = True
                ended_ret[i] = self._ret[i]
                self._ret[i] = 0.0
                # Seeds for later episodes: distinct per instance and episode, reproducible.
                obs, _ = env.reset(seed=self._seed + i + 100_003 * self._episodes)
            self._obs[i] = self._pack(obs)
            states.append(self._state(i, obs))
        if dones.any():
            self._episodes += 1
        info: dict = {"ended": dones}
        if dones.any():
            info["episode_return"] = ended_ret
        return self._obs.copy(), np.stack(states), rewards, dones, info


def _mpe2(name: str, **kwargs: Any) -> Callable[[], Any]:
    try:
        mod = importlib.import_module(f"mpe2.{name}")
    except ImportError as e:
        raise ConfigError(f"environment mpe2:{name} needs the 'marl' extra "
                          f"(pip install 'cogbert[marl]'): {e}") from None
    return lambda: mod.parallel_env(**kwargs)


# The published MAPPO figure for simple_spread uses a shared team reward (the original MPE's
# convention); mpe2's default mixes in a local reward (local_ratio 0.5). The trainer uses 0.
MARL_ENVS = ("ProductionLine-v0", "mpe2:simple_spread_v3")


def make_marl_env(env_id: str, num_envs: int, seed: int = 0, **kwargs: Any) -> MultiAgentVecEnv:
    """A multi-agent vector environment by name: ``ProductionLine-v0`` (keywords are config fields)
    or ``mpe2:NAME`` / ``module.path:callable`` for any PettingZoo Parallel environment factory."""
    if env_id in ("ProductionLine-v0", "ProductionLine"):
        return LineVecEnv(num_envs, seed, **kwargs)
    if env_id.startswith("mpe2:"):
        name = env_id.split(":", 1)[1]
        if name.startswith("simple_spread"):
            kwargs = {"local_ratio": 0.0, "max_cycles": 25, "continuous_actions": False, **kwargs}
        return PettingZooVecEnv(_mpe2(name, **kwargs), num_envs, seed)
    if ":" in env_id:
        module, _, attr = env_id.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot import the environment factory {env_id!r}: {e}") from None
        return PettingZooVecEnv(lambda: factory(**kwargs), num_envs, seed)
    raise ConfigError(f"unknown multi-agent environment {env_id!r}; known: {', '.join(MARL_ENVS)} "
                      "or module:factory of a PettingZoo Parallel environment")
