"""Training Cogbert policies with MLX: PPO in simulation, V-trace from fleet logs, export and
off-policy evaluation. The public API is what ``__all__`` lists."""

from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer, evaluate, preset

__all__ = ["PPOConfig", "PPOTrainer", "evaluate", "preset"]
