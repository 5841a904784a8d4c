"""Simulators the cloud trains policies in: ``ProductionChain-v0`` and ``CartPoleNoVel-v1``.

Both come as a ``gymnasium.Env`` and as a numpy vector environment that steps many instances
with array operations (same-step autoreset; see :mod:`.vector`). Importing this package
registers both ids with Gymnasium. ``docs/production-chain.md`` specifies ProductionChain.
Every other Gymnasium environment trains through :class:`GymVecEnv` (``gym_adapter``).
"""

from cogbert_cloud.learn.envs.cartpole_novel import (
                                                 CartPoleNoVelEnv,
                                                 CartPoleNoVelVecEnv,
                                                 CartPoleVecEnv,
)
from cogbert_cloud.learn.envs.gym_adapter import GymVecEnv, import_env_packages, resolve_env_id
from cogbert_cloud.learn.envs.heuristics import (
                                                 HeuristicPolicy,
                                                 MemoryHeuristicPolicy,
                                                 NoOpPolicy,
                                                 OraclePolicy,
                                                 RandomPolicy,
                                                 evaluate,
)
from cogbert_cloud.learn.envs.production_chain import (
                                                 ProductionChainEnv,
                                                 ProductionChainVecEnv,
                                                 decode_action,
                                                 encode_action,
                                                 observation_names,
)
from cogbert_cloud.learn.envs.production_chain_config import ProductionChainConfig
from cogbert_cloud.learn.envs.registry import ENV_IDS, is_own_env, make_env, make_vec_env, register_envs
from cogbert_cloud.learn.envs.vector import NumpyVecEnv, SingleEnv

register_envs()

__all__ = [
    "ENV_IDS",
    "CartPoleNoVelEnv",
    "CartPoleNoVelVecEnv",
    "CartPoleVecEnv",
    "GymVecEnv",
    "HeuristicPolicy",
    "MemoryHeuristicPolicy",
    "NoOpPolicy",
    "NumpyVecEnv",
    "OraclePolicy",
    "ProductionChainConfig",
    "ProductionChainEnv",
    "ProductionChainVecEnv",
    "RandomPolicy",
    "SingleEnv",
    "decode_action",
    "encode_action",
    "evaluate",
    "import_env_packages",
    "is_own_env",
    "make_env",
    "make_vec_env",
    "observation_names",
    "register_envs",
    "resolve_env_id",
]
