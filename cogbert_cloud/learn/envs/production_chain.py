"""``ProductionChain-v0``: a partially observable serial production line.

Raw material released by the agent flows through ``K`` stations with finite buffers between
them into finished goods (FG), which serve stochastic customer demand; unmet demand waits in a
backlog. Stations complete a unit with a fixed probability per period, wear while they work,
break down with a hazard that grows with their (hidden) wear and take a random time to repair.
The agent decides each period whether to release a unit of raw material and whether to take
one station down for preventive maintenance. Demand follows a hidden two-regime Markov chain.
The full specification, with every parameter, is ``docs/production-chain.md``.

Speed comes from two choices. Every random number an episode can use is drawn when the
episode starts, one block per instance and kind (they do not depend on the actions, which
also gives common random numbers: two policies on the same seed face the same demand and the
same machine luck). And all instances run in lockstep (the episode length is fixed and nothing
terminates early), so a step is a few dozen numpy operations on ``[N, K]`` arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

from cogbert_cloud.learn.envs.production_chain_config import ProductionChainConfig
from cogbert_cloud.learn.envs.vector import NumpyVecEnv, SingleEnv

__all__ = ["ProductionChainVecEnv", "ProductionChainEnv", "obs_dim", "n_actions",
           "decode_action", "encode_action", "observation_names", "SENSOR_RANGE"]

# The wear sensor reads wear plus noise within this range (wear rarely exceeds 2: a station
# that worn breaks down within a few periods).
SENSOR_RANGE = (-2.0, 5.0)


def obs_dim(config: ProductionChainConfig) -> int:
    """Observation size: ``4 K + 3`` (15 for the default 3 stations)."""
    return 4 * config.stations + 3


def n_actions(config: ProductionChainConfig) -> int:
    """Number of actions: ``2 (K + 1)``: release or not, times maintain none or station k."""
    return 2 * (config.stations + 1)


def observation_names(config: ProductionChainConfig) -> list[str]:
    """The name of each observation entry, by index (``docs/production-chain.md`` explains them)."""
    K = range(config.stations)
    return ([f"buffer_{k}" for k in K] + ["finished_goods", "backlog"]
            + [f"broken_{k}" for k in K] + [f"in_maintenance_{k}" for k in K]
            + [f"wear_sensor_{k}" for k in K] + ["arrivals"])


def encode_action(release: Any, maintain: Any) -> Any:
    """Action of ``release`` (0/1) and ``maintain`` (-1 for none, else the station index)."""
    return np.asarray(release, np.int64) + 2 * (np.asarray(maintain, np.int64) + 1)


def decode_action(action: Any) -> tuple[Any, Any]:
    """``(release, maintain)`` of an action: the inverse of :func:`encode_action`."""
    a = np.asarray(action, np.int64)
    return a & 1, (a >> 1) - 1


class ProductionChainVecEnv(NumpyVecEnv):
    """``num_envs`` production lines stepped together; see the module and vector docstrings."""

    def __init__(self, num_envs: int = 1, seed: int | None = None, *, autoreset: bool = True,
                 config: ProductionChainConfig | None = None,
                 max_episode_steps: int | None = None, **overrides: Any) -> None:
        super().__init__(num_envs, seed, autoreset=autoreset)
        if max_episode_steps is not None:  # what gymnasium.make_vec passes from the spec
            overrides["episode_length"] = int(max_episode_steps)
        cfg = config or ProductionChainConfig()
        self.config = cfg = cfg.replace(**overrides) if overrides else cfg
        K, N, T = cfg.stations, self.num_envs, cfg.episode_length
        high = np.full(obs_dim(cfg), 1.0, np.float32)
        high[3 * K + 2: 4 * K + 2] = SENSOR_RANGE[1]
        low = np.zeros_like(high)
        low[3 * K + 2: 4 * K + 2] = SENSOR_RANGE[0]
        self._init_spaces(spaces.Box(low, high, dtype=np.float32), spaces.Discrete(n_actions(cfg)))
        self.max_episode_steps = T
        self._stations = np.arange(K)
        self._p = np.asarray(cfg.process_prob, np.float64)
        self._t = 0
        # State (float64 counts, so that the arithmetic needs no casts).
        self.buffers = np.zeros((N, K))     # input buffer of each station
        self.fg = np.zeros(N)
        self.backlog = np.zeros(N)
        self.broken = np.zeros((N, K), bool)
        self.maint_left = np.zeros((N, K))  # periods of maintenance still to go
        self.wear = np.zeros((N, K))        # hidden
        self.regime = np.zeros((T + 1, N), bool)  # hidden; True = high demand; row t = period t
        # The episode's random numbers, period-major so that period t is one contiguous slice.
        self._u_proc = np.zeros((T, N, K))
        self._u_break = np.zeros((T, N, K))
        self._u_repair = np.zeros((T, N, K))
        self._wear_inc = np.zeros((T, N, K))
        self._noise = np.zeros((T + 1, N, K))
        self._demand_lo = np.zeros((T, N))
        self._demand_hi = np.zeros((T, N))
        self._demand = np.zeros((T, N))
        self._arrivals = np.zeros(N)

    @property
    def reward_range(self) -> tuple[float, float]:
        """Bounds no step's reward can leave (most steps are within [-2, 2])."""
        return self.config.reward_bounds()

    def hidden_state(self) -> dict[str, np.ndarray]:
        """What the observation hides, for oracles and tests: ``wear [N, K]`` and
        ``high_demand [N]`` (the regime of the coming period)."""
        return {"wear": self.wear.copy(), "high_demand": self.regime[self._t].copy()}

    # -- episode start ---------------------------------------------------------------------

    def _reset_rows(self, rows: np.ndarray) -> None:
        if len(rows) != self.num_envs:
            raise AssertionError("production lines run in lockstep and reset together")
        cfg = self.config
        K, T = cfg.stations, cfg.episode_length
        half_buf = cfg.buffer_capacity // 2
        u_regime = np.zeros((T + 1, self.num_envs))
        for i, rng in enumerate(self._rngs):
            # Three draws per instance and episode, in a fixed order (part of the seeding
            # contract: changing it changes every seeded trajectory).
            u = rng.random((T + 1, 4 * K + 1))
            z = rng.standard_normal((T + 1, K))
            demand = rng.poisson((cfg.demand_low, cfg.demand_high), size=(T, 2))
            self._u_proc[:, i] = u[:T, 0:K]
            self._u_break[:, i] = u[:T, K:2 * K]
            self._u_repair[:, i] = u[:T, 2 * K:3 * K]
            self._wear_inc[:, i] = u[:T, 3 * K:4 * K]
            u_regime[:, i] = u[:, 4 * K]
            self._noise[:, i] = z
            self._demand_lo[:, i] = demand[:, 0]
            self._demand_hi[:, i] = demand[:, 1]
            # The initial state comes from the last row of u, which no period uses.
            init = u[T]
            self.wear[i] = cfg.initial_wear * init[0:K]
            self.buffers[i] = np.floor(init[K:2 * K] * (half_buf + 1))
            self.fg[i] = np.floor(init[2 * K] * (cfg.fg_capacity // 2 + 1))
        # Exponential wear increments by inversion: 1 - u is in (0, 1], so the log is finite.
        self._wear_inc *= -1.0
        np.log1p(self._wear_inc, out=self._wear_inc)
        self._wear_inc *= -cfg.wear_rate
        self._noise *= cfg.sensor_noise
        self._regime_path(u_regime)
        np.copyto(self._demand, np.where(self.regime[:T], self._demand_hi, self._demand_lo))
        np.minimum(self._demand, cfg.demand_max, out=self._demand)
        self.backlog[:] = 0.0
        self.broken[:] = False
        self.maint_left[:] = 0.0
        self._arrivals[:] = 0.0
        self._t = 0
        self._write_obs()

    def _regime_path(self, u: np.ndarray) -> None:
        cfg = self.config
        p_hi = cfg.p_low_to_high / (cfg.p_low_to_high + cfg.p_high_to_low)
        # The first period's regime comes from the chain's stationary distribution.
        r = u[0] < p_hi
        self.regime[0] = r
        for t in range(1, cfg.episode_length + 1):
            switch = u[t] < np.where(r, cfg.p_high_to_low, cfg.p_low_to_high)
            r = r ^ switch
            self.regime[t] = r

    # -- one period ------------------------------------------------------------------------

    def _step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.config
        t = self._t
        if t >= cfg.episode_length:
            raise RuntimeError("the episode has ended; call reset()")
        buf, wear, broken, maint_left = self.buffers, self.wear, self.broken, self.maint_left
        release = (actions & 1).astype(bool)
        target = (actions >> 1) - 1
        up = ~broken & (maint_left == 0)
        # Preventive maintenance: only a running station can be taken down; it restores it
        # to as good as new and keeps it down for maint_periods periods, this one included.
        start = up & (target[:, None] == self._stations)
        maint_left += start * float(cfg.maint_periods)
        wear *= ~start
        up &= ~start
        in_maint = maint_left > 0
        buf[:, 0] += release & (buf[:, 0] < cfg.buffer_capacity)
        # A station works when it is up, has an input and has room downstream (blocking
        # before service, judged on the levels at the start of the period).
        room = np.empty_like(up)
        np.less(buf[:, 1:], cfg.buffer_capacity, out=room[:, :-1])
        np.less(self.fg, cfg.fg_capacity, out=room[:, -1])
        busy = up & (buf > 0) & room
        hazard = cfg.hazard_base + cfg.hazard_slope * wear ** cfg.hazard_power
        breaks = busy & (self._u_break[t] < hazard)
        done = busy & ~breaks & (self._u_proc[t] < self._p)
        wear += busy * self._wear_inc[t]
        buf -= done
        buf[:, 1:] += done[:, :-1]
        self.fg += done[:, -1]
        # Repairs (of stations broken before this period) restore them to as good as new.
        fixed = broken & (self._u_repair[t] < cfg.repair_prob)
        wear *= ~fixed
        broken ^= fixed
        broken |= breaks
        maint_left -= in_maint
        # Demand: serve the backlog first-come-first-served from FG; beyond the backlog's
        # capacity orders are lost.
        arrivals = self._demand[t]
        need = self.backlog + arrivals
        ship = np.minimum(self.fg, need)
        self.fg -= ship
        backlog = need - ship
        lost = np.maximum(backlog - cfg.backlog_capacity, 0.0)
        self.backlog = backlog - lost
        self._arrivals = arrivals
        cost = (cfg.hold_wip * buf.sum(axis=1) + cfg.hold_fg * self.fg
                + cfg.backlog_cost * self.backlog + cfg.lost_sale_cost * lost
                + cfg.downtime_cost * broken.sum(axis=1) + cfg.maint_cost * in_maint.sum(axis=1)
                + cfg.breakdown_cost * breaks.sum(axis=1))
        reward = cfg.reward_scale * (cfg.price * ship - cost)
        self._t = t + 1
        self._write_obs()
        truncated = np.full(self.num_envs, self._t >= cfg.episode_length)
        return reward, np.zeros(self.num_envs, bool), truncated

    def _write_obs(self) -> None:
        cfg = self.config
        K = cfg.stations
        o = self._obs
        o[:, 0:K] = self.buffers * (1.0 / cfg.buffer_capacity)
        o[:, K] = self.fg * (1.0 / cfg.fg_capacity)
        o[:, K + 1] = self.backlog * (1.0 / cfg.backlog_capacity)
        o[:, K + 2:2 * K + 2] = self.broken
        o[:, 2 * K + 2:3 * K + 2] = self.maint_left > 0
        np.clip(self.wear + self._noise[self._t], *SENSOR_RANGE, out=o[:, 3 * K + 2:4 * K + 2])
        o[:, 4 * K + 2] = self._arrivals * (1.0 / cfg.demand_max)


class ProductionChainEnv(SingleEnv):
    """``ProductionChain-v0`` as a ``gymnasium.Env``; ``config`` fields can be given as keywords."""

    def __init__(self, config: ProductionChainConfig | None = None, **overrides: Any) -> None:
        cfg = config or ProductionChainConfig()
        if overrides:
            cfg = cfg.replace(**overrides)
        super().__init__(ProductionChainVecEnv(1, config=cfg, autoreset=False))
        self.config = cfg

    def hidden_state(self) -> dict[str, np.ndarray]:
        """Hidden wear ``[K]`` and regime, as :meth:`ProductionChainVecEnv.hidden_state`."""
        h = self.core.hidden_state()  # type: ignore[attr-defined]
        return {k: v[0] for k, v in h.items()}
