"""Gymnasium ids of Cogbert's simulators, and the helpers that build them by name.

Importing :mod:`cogbert_cloud.learn.envs` registers ``CartPoleNoVel-v1`` and ``ProductionChain-v0``
with Gymnasium, each with a ``vector_entry_point``, so ``gymnasium.make(id)`` gives the
single environment and ``gymnasium.make_vec(id, n, vectorization_mode="vector_entry_point")``
the numpy vector one. :func:`make_env` and :func:`make_vec_env` build the same objects
without Gymnasium's wrappers (its environment checker and time limit add a few microseconds
to every step, and the time limits are built into these environments).

Any other id goes to Gymnasium: :func:`make_vec_env` then gives a
:class:`~cogbert_cloud.learn.envs.gym_adapter.GymVecEnv` with the same vector contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

from cogbert_cloud.learn.envs.cartpole_novel import (
    CARTPOLE_MAX_STEPS,
    CartPoleNoVelEnv,
    CartPoleNoVelVecEnv,
)
from cogbert_cloud.learn.envs.gym_adapter import GymVecEnv, resolve_env_id
from cogbert_cloud.learn.envs.production_chain import ProductionChainEnv, ProductionChainVecEnv
from cogbert_cloud.learn.envs.production_chain_config import ProductionChainConfig
from cogbert_cloud.learn.envs.vector import NumpyVecEnv

__all__ = ["ENV_IDS", "register_envs", "make_env", "make_vec_env", "is_own_env"]

_MODULE = __name__.rsplit(".", 1)[0]
# id -> (single class, vector class, episode length)
_ENVS: dict[str, tuple[Callable[..., gym.Env], Callable[..., NumpyVecEnv], int]] = {
    "CartPoleNoVel-v1": (CartPoleNoVelEnv, CartPoleNoVelVecEnv, CARTPOLE_MAX_STEPS),
    "ProductionChain-v0": (ProductionChainEnv, ProductionChainVecEnv,
                           ProductionChainConfig().episode_length),
}
ENV_IDS: tuple[str, ...] = tuple(_ENVS)


def register_envs() -> None:
    """Register every id with Gymnasium (idempotent)."""
    for env_id, (single, vector, steps) in _ENVS.items():
        if env_id in gym.registry:
            continue
        module = f"{_MODULE}.{single.__module__.rsplit('.', 1)[1]}"
        gym.register(id=env_id, entry_point=f"{module}:{single.__name__}",
                     vector_entry_point=f"{module}:{vector.__name__}",
                     max_episode_steps=steps)


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """The single environment ``env_id``: Cogbert's own (``"ProductionChain-v0"``, or without
    the version) without wrappers, or any Gymnasium id through ``gymnasium.make``."""
    own = _lookup(env_id)
    if own is not None:
        return own[0](**kwargs)
    return gym.make(resolve_env_id(env_id), **kwargs)


def make_vec_env(env_id: str, num_envs: int, seed: int | None = None, *, vectorization: str = "auto",
                 **kwargs: Any) -> NumpyVecEnv | GymVecEnv:
    """The vector environment ``env_id`` with ``num_envs`` instances; instance ``i`` is
    seeded ``seed + i`` at the first ``reset()``. ``kwargs`` go to the constructor (for
    ``ProductionChain``: ``config=`` or any config field). Cogbert's own ids give their numpy
    vector environment; any other Gymnasium id a :class:`GymVecEnv` (``vectorization``:
    ``auto``, ``sync`` or ``async``)."""
    own = _lookup(env_id)
    if own is not None:
        return own[1](num_envs, seed, **kwargs)
    return GymVecEnv(env_id, num_envs, seed, vectorization=vectorization, **kwargs)


def is_own_env(env_id: str) -> bool:
    """Whether ``env_id`` is one of Cogbert's numpy simulators (checkpoints hold their state)."""
    return _lookup(env_id) is not None


def _lookup(env_id: str) -> tuple[Callable[..., Any], Callable[..., Any], int] | None:
    for known, entry in _ENVS.items():
        if env_id in (known, known.rsplit("-v", 1)[0]):
            return entry
    return None
