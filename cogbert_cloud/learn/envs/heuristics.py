"""Hand-written policies for ``ProductionChain-v0``: the baseline to beat and its yardsticks.

All are vectorised over instances (``act(obs [N, D]) -> actions [N]``) and share one decision
rule, :func:`decide`: release raw material while the inventory position is below a base-stock
level, and take the most worn running station down for maintenance once its wear estimate
passes a threshold. They differ only in what they feed it:

* :class:`HeuristicPolicy` (**the baseline**): the current observation only, memoryless: the
  raw noisy wear sensor, one base-stock level.
* :class:`MemoryHeuristicPolicy`: a filter over past observations: a Kalman filter per
  station on the wear sensor (wear drifts up while the station works and restarts at 0 after
  a repair or maintenance) and a two-state HMM filter on arrivals for the demand regime, which
  picks one of two base-stock levels. What a recurrent policy can learn to do.
* :class:`OraclePolicy`: the same rule on the true hidden wear and regime.

Their parameters were tuned by a coarse grid search on seeds disjoint from the ones the docs
report (``docs/production-chain.md``), each within its own class, so that the baseline is the
best memoryless rule of its form rather than a straw man.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cogbert_cloud.learn.envs.production_chain import (
    ProductionChainVecEnv,
    decode_action,
    encode_action,
)
from cogbert_cloud.learn.envs.production_chain_config import ProductionChainConfig

__all__ = ["Policy", "Observation", "decide", "NoOpPolicy", "RandomPolicy", "HeuristicPolicy",
           "MemoryHeuristicPolicy", "OraclePolicy", "evaluate"]


class Policy(Protocol):
    def reset(self, num_envs: int) -> None: ...
    def act(self, obs: np.ndarray) -> np.ndarray: ...


@dataclass
class Observation:
    """An observation batch ``[N, 4K+3]`` in the units of the model (counts, wear)."""

    buffers: np.ndarray   # [N, K]
    fg: np.ndarray        # [N]
    backlog: np.ndarray   # [N]
    broken: np.ndarray    # [N, K] bool
    maint: np.ndarray     # [N, K] bool
    sensor: np.ndarray    # [N, K]
    arrivals: np.ndarray  # [N]

    @classmethod
    def parse(cls, obs: np.ndarray, cfg: ProductionChainConfig) -> Observation:
        K = cfg.stations
        o = np.asarray(obs, np.float64)
        return cls(buffers=np.rint(o[:, :K] * cfg.buffer_capacity),
                   fg=np.rint(o[:, K] * cfg.fg_capacity),
                   backlog=np.rint(o[:, K + 1] * cfg.backlog_capacity),
                   broken=o[:, K + 2:2 * K + 2] > 0.5, maint=o[:, 2 * K + 2:3 * K + 2] > 0.5,
                   sensor=o[:, 3 * K + 2:4 * K + 2],
                   arrivals=np.rint(o[:, 4 * K + 2] * cfg.demand_max))


def decide(o: Observation, cfg: ProductionChainConfig, wear: np.ndarray, threshold: float,
           base_stock: np.ndarray | float) -> np.ndarray:
    """The shared rule: actions ``[N]`` from a wear estimate ``[N, K]`` and base-stock levels.

    Release one unit when ``sum(buffers) + fg - backlog < base_stock``. Maintain the running
    station with the highest wear estimate if that is above ``threshold``, unless another
    station is already down (one station down at a time keeps the line flowing).
    """
    position = o.buffers.sum(axis=1) + o.fg - o.backlog
    release = (position < base_stock) & (o.buffers[:, 0] < cfg.buffer_capacity)
    down = o.broken | o.maint
    est = np.where(down, -np.inf, wear)
    worst = est.argmax(axis=1)
    go = (est.max(axis=1) > threshold) & ~down.any(axis=1)
    return encode_action(release, np.where(go, worst, -1))


class NoOpPolicy:
    """Always action 0: release nothing, maintain nothing."""

    def reset(self, num_envs: int) -> None:
        self.n = num_envs

    def act(self, obs: np.ndarray) -> np.ndarray:
        return np.zeros(len(obs), np.int64)


class RandomPolicy:
    """Uniformly random actions from its own seeded generator."""

    def __init__(self, n_actions: int, seed: int = 0) -> None:
        self.n_actions = n_actions
        self.rng = np.random.default_rng(seed)

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, self.n_actions, len(obs))


class HeuristicPolicy:
    """The baseline: base-stock release and threshold maintenance on the raw sensor."""

    def __init__(self, config: ProductionChainConfig | None = None, *, base_stock: float = 9,
                 threshold: float = 0.85) -> None:
        self.cfg = config or ProductionChainConfig()
        self.base_stock = base_stock
        self.threshold = threshold

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        o = Observation.parse(obs, self.cfg)
        return decide(o, self.cfg, o.sensor, self.threshold, self.base_stock)


class MemoryHeuristicPolicy:
    """The rule on filtered estimates: Kalman-filtered wear, HMM-filtered demand regime."""

    def __init__(self, config: ProductionChainConfig | None = None, *,
                 base_stock: tuple[float, float] = (8, 12), threshold: float = 0.2) -> None:
        self.cfg = config or ProductionChainConfig()
        self.base_stock = base_stock
        self.threshold = threshold

    def reset(self, num_envs: int) -> None:
        cfg = self.cfg
        K = cfg.stations
        self.mean = np.full((num_envs, K), cfg.initial_wear / 2)
        self.var = np.full((num_envs, K), cfg.initial_wear ** 2 / 12)
        self.was_down = np.zeros((num_envs, K), bool)
        pi = cfg.p_low_to_high / (cfg.p_low_to_high + cfg.p_high_to_low)
        self.p_high = np.full(num_envs, pi)
        self.first = True

    def act(self, obs: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        o = Observation.parse(obs, cfg)
        self._update_wear(o)
        if not self.first:
            self._update_regime(o.arrivals)
        self.first = False
        base_stock = np.where(self.p_high > 0.5, self.base_stock[1], self.base_stock[0])
        actions = decide(o, cfg, self.mean, self.threshold, base_stock)
        # A station sent to maintenance comes back as good as new: so does our estimate.
        sent = decode_action(actions)[1][:, None] == np.arange(cfg.stations)
        self.mean[sent] = 0.0
        self.var[sent] = 1e-6
        return actions

    def _update_wear(self, o: Observation) -> None:
        cfg = self.cfg
        down = o.broken | o.maint
        restored = self.was_down & ~down
        self.mean[restored] = 0.0
        self.var[restored] = 1e-6
        self.was_down = down
        # Predict: a running station with work wears by wear_rate on average (variance of
        # an exponential increment: wear_rate**2).
        working = ~down & (o.buffers > 0)
        self.mean += working * cfg.wear_rate
        self.var += working * cfg.wear_rate ** 2
        # Update with the sensor (Gaussian noise of known variance).
        r = cfg.sensor_noise ** 2
        gain = self.var / (self.var + r)
        self.mean += gain * (o.sensor - self.mean)
        self.var *= 1.0 - gain

    def _update_regime(self, arrivals: np.ndarray) -> None:
        cfg = self.cfg
        # p_high is the prior for the period whose arrivals we now see: weigh them.
        p = self.p_high
        lo = _poisson_pmf(arrivals, cfg.demand_low, cfg.demand_max)
        hi = _poisson_pmf(arrivals, cfg.demand_high, cfg.demand_max)
        self.p_high = p * hi / (p * hi + (1 - p) * lo)
        # The belief is for the period just observed; the next one may switch again.
        self.p_high = self.p_high * (1 - cfg.p_high_to_low) + (1 - self.p_high) * cfg.p_low_to_high


class OraclePolicy:
    """The rule on the true hidden wear and regime, read from the environment."""

    def __init__(self, env: ProductionChainVecEnv, *, base_stock: tuple[float, float] = (7, 12),
                 threshold: float = 0.2) -> None:
        self.env = env
        self.cfg = env.config
        self.base_stock = base_stock
        self.threshold = threshold

    def reset(self, num_envs: int) -> None:
        pass

    def act(self, obs: np.ndarray) -> np.ndarray:
        o = Observation.parse(obs, self.cfg)
        hidden = self.env.hidden_state()
        base_stock = np.where(hidden["high_demand"], self.base_stock[1], self.base_stock[0])
        return decide(o, self.cfg, hidden["wear"], self.threshold, base_stock)


def _poisson_pmf(k: np.ndarray, lam: float, k_max: int) -> np.ndarray:
    """P(min(Poisson(lam), k_max) = k): arrivals are capped at k_max."""
    pmf = np.array([math.exp(-lam) * lam ** j / math.factorial(j) for j in range(k_max)])
    table = np.append(pmf, 1.0 - pmf.sum())
    return table[k.astype(np.int64)]


def evaluate(make_policy, episodes: int, seed: int,
             config: ProductionChainConfig | None = None) -> np.ndarray:
    """Undiscounted return of each of ``episodes`` episodes, instance ``i`` seeded ``seed + i``.

    ``make_policy(env)`` builds the policy for the vector environment (the oracle needs it).
    """
    env = ProductionChainVecEnv(episodes, config=config, autoreset=False)
    policy = make_policy(env)
    obs, _ = env.reset(seed=seed)
    policy.reset(episodes)
    total = np.zeros(episodes)
    for _ in range(env.config.episode_length):
        obs, reward, _, _, _ = env.step(policy.act(obs))
        total += reward
    return total
