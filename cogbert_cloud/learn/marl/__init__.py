"""Multi-agent training: MAPPO and IPPO with Cogbert's recurrent actor, on ``ProductionLine-v0`` or any
PettingZoo Parallel environment (``docs/multi-agent.md``)."""

from cogbert_cloud.learn.marl.envs import MARL_ENVS, LineVecEnv, PettingZooVecEnv, make_marl_env
from cogbert_cloud.learn.marl.mappo import (
    MARL_PRESETS,
    MARLConfig,
    MARLTrainer,
    actor_input,
    evaluate_bundles,
    marl_preset,
)

__all__ = ["MARL_ENVS", "MARL_PRESETS", "LineVecEnv", "MARLConfig", "MARLTrainer", "PettingZooVecEnv",
           "actor_input", "evaluate_bundles", "make_marl_env", "marl_preset"]
