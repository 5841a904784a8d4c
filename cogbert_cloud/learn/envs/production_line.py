"""``ProductionLine-v0``: the production line of ``ProductionChain-v0`` run by one agent per station.

Each station of a serial line is its own decision-maker (its own device at a site). Every period
each station chooses to ``IDLE``, ``WORK`` (take a unit from its input buffer; station 0 takes raw
material, which is unlimited) or claim the site's maintenance crew (``MAINTAIN``). The crew is a
shared resource: ``crews`` stations at most can be in maintenance at once, so two stations that
claim it in the same period conflict; the crew goes to the claimant whose wear sensor reads
highest (ties: the lower station index), and the others lose the period. A site's coordinator
resolves claims with the same rule (``cogbert_cloud.service.coordinator``), so a coordinated site
and the simulator agree.

Partial observability: a station sees its own input and output buffers, its own machine (broken,
in maintenance, a noisy wear sensor), whether the crew is free and whether its last claim was
denied; only the last station sees customer demand (backlog and arrivals), which is the hidden
two-regime chain of ``ProductionChain``. The first station learns about demand only through the
buffers filling up (back-pressure), which is why memory and cooperation matter.

All agents share one team reward (revenue minus every cost); ``infos[agent]["cost"]`` is the part
of the costs the station caused (its output buffer's holding cost, its downtime, maintenance,
breakdowns and denied claims), documented in ``docs/multi-agent.md``. The global state for a
centralized critic is the concatenation of the agents' local observations plus the episode's
progress: exactly what joining the logs of a site's devices on (site, step) rebuilds.

Two forms: :class:`ProductionLineVecEnv` steps ``N`` lines with numpy array operations (what the
trainer uses), and :class:`ProductionLineParallelEnv` is one line in PettingZoo's Parallel API.
Seeding follows ``ProductionChain``: every random number an episode uses is drawn when it
starts (common random numbers: two policies on one seed face the same demand and machine luck).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from cogbert_edge.errors import ConfigError

__all__ = ["ProductionLineConfig", "ProductionLineVecEnv", "ProductionLineParallelEnv", "IDLE", "WORK",
           "MAINTAIN", "LOCAL_OBS_NAMES", "local_obs_dim", "state_dim", "agent_names", "resolve_claims",
           "HeuristicTeamPolicy", "RandomTeamPolicy", "evaluate_team"]

IDLE, WORK, MAINTAIN = 0, 1, 2
N_ACTIONS = 3
SENSOR_RANGE = (-2.0, 5.0)
LOCAL_OBS_NAMES = ("input_level", "output_level", "broken", "in_maintenance", "wear_sensor", "crew_free",
                   "backlog", "arrivals", "claim_denied")


@dataclass(frozen=True)
class ProductionLineConfig:
    """Parameters (defaults are the registered environment); the dynamics' parameters mean what
    they mean in ``ProductionChainConfig`` (``docs/production-chain.md``)."""

    stations: int = 3
    episode_length: int = 128
    process_prob: tuple[float, ...] = (0.85, 0.75, 0.90)
    buffer_capacity: int = 6          # each station's output buffer (the next station's input)
    fg_capacity: int = 12
    backlog_capacity: int = 12
    demand_low: float = 0.25
    demand_high: float = 0.6
    p_low_to_high: float = 0.03
    p_high_to_low: float = 0.035
    demand_max: int = 3
    wear_rate: float = 0.02
    hazard_base: float = 0.0005
    hazard_slope: float = 0.2
    hazard_power: float = 2.0
    repair_prob: float = 0.06
    maint_periods: int = 3
    crews: int = 1                    # stations that can be in maintenance at once
    sensor_noise: float = 0.5
    initial_wear: float = 0.6
    price: float = 15.0
    hold_wip: float = 0.1
    hold_fg: float = 0.2
    backlog_cost: float = 1.0         # a team cost: nobody alone causes lateness
    lost_sale_cost: float = 2.0       # a team cost
    downtime_cost: float = 4.0
    maint_cost: float = 1.0
    breakdown_cost: float = 5.0
    deny_cost: float = 0.5            # a claim the crew could not serve: the period is lost
    reward_scale: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.process_prob, tuple):
            object.__setattr__(self, "process_prob", tuple(self.process_prob))
        for name in ("stations", "episode_length", "buffer_capacity", "fg_capacity", "backlog_capacity",
                     "demand_max", "maint_periods", "crews"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if len(self.process_prob) != self.stations:
            raise ConfigError(f"process_prob needs one value per station ({self.stations}), "
                              f"got {len(self.process_prob)}")
        for name in ("p_low_to_high", "p_high_to_low", "hazard_base", "repair_prob"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {v!r}")
        if any(not 0.0 <= p <= 1.0 for p in self.process_prob):
            raise ConfigError(f"process_prob values must be in [0, 1], got {self.process_prob!r}")
        if self.p_low_to_high + self.p_high_to_low <= 0:
            raise ConfigError("the demand regime must be able to switch one way or the other")

    def replace(self, **changes: Any) -> ProductionLineConfig:
        return dataclasses.replace(self, **changes)


def local_obs_dim(config: ProductionLineConfig | None = None) -> int:
    """Size of one agent's local observation (9, whatever the number of stations)."""
    return len(LOCAL_OBS_NAMES)


def state_dim(config: ProductionLineConfig) -> int:
    """Size of the global state: every agent's local observation, then the episode's progress."""
    return config.stations * len(LOCAL_OBS_NAMES) + 1


def agent_names(config: ProductionLineConfig) -> list[str]:
    return [f"station_{k}" for k in range(config.stations)]


def resolve_claims(claims: np.ndarray, sensor: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Which maintenance claims the crew serves: ``claims, sensor [N, K]`` (bool, float) and
    ``free [N]`` crews; the highest sensor reading first, ties to the lower station index.

    The one conflict rule of a site: the simulator and the site coordinator both call it.
    """
    claims = np.asarray(claims, bool)
    N, K = claims.shape
    # Sort claimants by (-sensor, index); np.lexsort sorts by the last key first.
    key = np.where(claims, -np.asarray(sensor, np.float64), np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(K), (N, K)), key), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(K)[None, :].repeat(N, 0), axis=1)
    return claims & (rank < np.asarray(free)[:, None])


class ProductionLineVecEnv:
    """``num_envs`` lines in lockstep (fixed episode length, reset together).

    ``reset(seed) -> (obs [N, K, 9], state [N, 9K+1])``;
    ``step(actions [N, K]) -> (obs, state, reward [N], agent_cost [N, K], done [N], info)``;
    ``done`` is a time limit (a truncation), on every line at once.
    """

    def __init__(self, num_envs: int = 1, seed: int | None = None, *,
                 config: ProductionLineConfig | None = None, **overrides: Any) -> None:
        if int(num_envs) < 1:
            raise ConfigError(f"num_envs must be >= 1, got {num_envs}")
        cfg = config or ProductionLineConfig()
        self.config = cfg = cfg.replace(**overrides) if overrides else cfg
        self.num_envs = N = int(num_envs)
        K, T = cfg.stations, cfg.episode_length
        self.n_agents, self.obs_dim, self.state_dim, self.n_actions = K, local_obs_dim(cfg), state_dim(cfg), N_ACTIONS
        self.episode_length = T
        self.agents = agent_names(cfg)
        self._seed = seed
        self._episode = 0
        self._p = np.asarray(cfg.process_prob, np.float64)
        self._t = 0
        self.out = np.zeros((N, K))           # output buffer of each station (the last: FG)
        self.backlog = np.zeros(N)
        self.broken = np.zeros((N, K), bool)
        self.maint_left = np.zeros((N, K))
        self.wear = np.zeros((N, K))          # hidden
        self.regime = np.zeros((T + 1, N), bool)
        self.denied = np.zeros((N, K), bool)
        self.arrivals = np.zeros(N)
        self._obs = np.zeros((N, K, self.obs_dim), np.float32)
        self.stats = {"conflicts": 0, "claims": 0, "denied": 0, "breakdowns": 0, "shipped": 0.0}

    # -- episode start ---------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """New episodes; line ``i`` is seeded ``seed + i`` (without a seed: the constructor's seed,
        advanced by one episode's worth per reset, so successive episodes differ)."""
        cfg = self.config
        K, T, N = cfg.stations, cfg.episode_length, self.num_envs
        if seed is None:
            base = (self._seed or 0) + 100_003 * self._episode
        else:
            base = int(seed)
            self._seed, self._episode = base, 0
        self._episode += 1
        self._u = np.zeros((T, N, 3 * K))
        self._wear_inc = np.zeros((T, N, K))
        self._noise = np.zeros((T + 1, N, K))
        self._demand = np.zeros((T, N))
        u_regime = np.zeros((T + 1, N))
        for i in range(N):
            rng = np.random.default_rng(base + i)
            u = rng.random((T + 1, 4 * K + 1))
            z = rng.standard_normal((T + 1, K))
            demand = rng.poisson((cfg.demand_low, cfg.demand_high), size=(T, 2))
            self._u[:, i] = u[:T, :3 * K]
            self._wear_inc[:, i] = -cfg.wear_rate * np.log1p(-u[:T, 3 * K:4 * K])
            u_regime[:, i] = u[:, 4 * K]
            self._noise[:, i] = cfg.sensor_noise * z
            init = u[T]
            self.wear[i] = cfg.initial_wear * init[0:K]
            self.out[i, :K - 1] = np.floor(init[K:2 * K - 1] * (cfg.buffer_capacity // 2 + 1))
            self.out[i, K - 1] = np.floor(init[2 * K - 1] * (cfg.fg_capacity // 2 + 1))
            self._regime_row(u_regime[:, i], i)
            self._demand[:, i] = np.minimum(np.where(self.regime[:T, i], demand[:, 1], demand[:, 0]),
                                            cfg.demand_max)
        self.backlog[:] = 0.0
        self.broken[:] = False
        self.maint_left[:] = 0.0
        self.denied[:] = False
        self.arrivals[:] = 0.0
        self._t = 0
        self._write_obs()
        return self._obs.copy(), self.state()

    def _regime_row(self, u: np.ndarray, i: int) -> None:
        cfg = self.config
        p_hi = cfg.p_low_to_high / (cfg.p_low_to_high + cfg.p_high_to_low)
        r = bool(u[0] < p_hi)
        self.regime[0, i] = r
        for t in range(1, cfg.episode_length + 1):
            if u[t] < (cfg.p_high_to_low if r else cfg.p_low_to_high):
                r = not r
            self.regime[t, i] = r

    def hidden_state(self) -> dict[str, np.ndarray]:
        """What no agent observes: ``wear [N, K]`` and ``high_demand [N]``."""
        return {"wear": self.wear.copy(), "high_demand": self.regime[self._t].copy()}

    def state(self) -> np.ndarray:
        """The global state ``[N, 9K + 1]``: the agents' observations and the episode's progress."""
        N = self.num_envs
        prog = np.full((N, 1), self._t / self.config.episode_length, np.float32)
        return np.concatenate([self._obs.reshape(N, -1), prog], axis=1)

    # -- one period ------------------------------------------------------------------------

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
        cfg = self.config
        K, N, t = cfg.stations, self.num_envs, self._t
        if t >= cfg.episode_length:
            raise ConfigError("the episode has ended; call reset()")
        a = np.asarray(actions)
        if a.shape != (N, K) or not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= N_ACTIONS:
            raise ConfigError(f"actions must be integers in [0, {N_ACTIONS}) of shape {(N, K)}, "
                              f"got {a.dtype} {a.shape}")
        out, wear, broken, maint_left = self.out, self.wear, self.broken, self.maint_left
        up = ~broken & (maint_left == 0)
        # 1. Maintenance claims, served by the crew in order of the sensor reading the agents saw.
        claims = (a == MAINTAIN) & up
        free = cfg.crews - (maint_left > 0).sum(axis=1)
        granted = resolve_claims(claims, self._obs[:, :, 4], np.maximum(free, 0))
        denied = claims & ~granted
        conflicts = int((claims.sum(axis=1) > np.maximum(free, 0)).sum())
        maint_left += granted * float(cfg.maint_periods)
        wear *= ~granted
        up &= ~granted
        in_maint = maint_left > 0
        # 2. Work: up, asked to, with an input (station 0: raw material) and room downstream
        # (judged on the levels at the start of the period: a unit moves one station at most).
        caps = np.full(K, float(cfg.buffer_capacity))
        caps[-1] = cfg.fg_capacity
        has_input = np.ones((N, K), bool)
        has_input[:, 1:] = out[:, :-1] > 0
        busy = up & (a == WORK) & has_input & (out < caps)
        u = self._u[t]
        hazard = cfg.hazard_base + cfg.hazard_slope * wear ** cfg.hazard_power
        breaks = busy & (u[:, K:2 * K] < hazard)
        done = busy & ~breaks & (u[:, 0:K] < self._p)
        wear += busy * self._wear_inc[t]
        out += done
        out[:, :-1] -= done[:, 1:]
        # 3. Repairs of stations broken before this period; maintenance counts down.
        fixed = broken & (u[:, 2 * K:3 * K] < cfg.repair_prob)
        wear *= ~fixed
        broken ^= fixed
        broken |= breaks
        maint_left -= in_maint
        # 4. Demand, served from FG first come first served; beyond the backlog's capacity lost.
        arrivals = self._demand[t]
        need = self.backlog + arrivals
        ship = np.minimum(out[:, -1], need)
        out[:, -1] -= ship
        backlog = need - ship
        lost = np.maximum(backlog - cfg.backlog_capacity, 0.0)
        self.backlog = backlog - lost
        self.arrivals = arrivals
        self.denied = denied
        hold = np.full(K, cfg.hold_wip)
        hold[-1] = cfg.hold_fg
        agent_cost = (hold * out + cfg.downtime_cost * broken + cfg.maint_cost * in_maint
                      + cfg.breakdown_cost * breaks + cfg.deny_cost * denied)
        team_cost = cfg.backlog_cost * self.backlog + cfg.lost_sale_cost * lost
        reward = cfg.reward_scale * (cfg.price * ship - agent_cost.sum(axis=1) - team_cost)
        self._t = t + 1
        self._write_obs()
        self.stats["conflicts"] += conflicts
        self.stats["claims"] += int(claims.sum())
        self.stats["denied"] += int(denied.sum())
        self.stats["breakdowns"] += int(breaks.sum())
        self.stats["shipped"] += float(ship.sum())
        info = {"ship": ship, "conflicts": conflicts, "granted": granted, "denied": denied}
        dones = np.full(N, self._t >= cfg.episode_length)
        return (self._obs.copy(), self.state(), reward, cfg.reward_scale * agent_cost, dones, info)

    def _write_obs(self) -> None:
        cfg = self.config
        K = cfg.stations
        o = self._obs
        caps = np.full(K, float(cfg.buffer_capacity))
        caps[-1] = cfg.fg_capacity
        o[:, 0, 0] = 1.0                          # raw material is always there
        o[:, 1:, 0] = self.out[:, :-1] / cfg.buffer_capacity
        o[:, :, 1] = self.out / caps
        o[:, :, 2] = self.broken
        o[:, :, 3] = self.maint_left > 0
        o[:, :, 4] = np.clip(self.wear + self._noise[self._t], *SENSOR_RANGE)
        o[:, :, 5] = ((cfg.crews - (self.maint_left > 0).sum(axis=1)) / cfg.crews)[:, None]
        o[:, :, 6:8] = 0.0
        o[:, K - 1, 6] = self.backlog / cfg.backlog_capacity
        o[:, K - 1, 7] = self.arrivals / cfg.demand_max
        o[:, :, 8] = self.denied


try:  # PettingZoo is optional (the ``marl`` extra); without it the class keeps the same API.
    from pettingzoo.utils.env import ParallelEnv as _ParallelBase
except ImportError:  # pragma: no cover - exercised where PettingZoo is absent
    _ParallelBase = object  # type: ignore[assignment,misc,unused-ignore]


class ProductionLineParallelEnv(_ParallelBase):  # type: ignore[misc,valid-type,unused-ignore]
    """One line in PettingZoo's Parallel API (``pettingzoo.utils.env.ParallelEnv`` when PettingZoo
    is installed, so its API test applies): ``reset(seed) -> (obs, infos)``,
    ``step(actions) -> (obs, rewards, terminations, truncations, infos)``, ``state()``."""

    metadata = {"name": "ProductionLine-v0", "render_modes": [], "is_parallelizable": True}

    def __init__(self, config: ProductionLineConfig | None = None, **overrides: Any) -> None:
        from gymnasium import spaces
        self.core = ProductionLineVecEnv(1, config=config, **overrides)
        self.config = self.core.config
        self.possible_agents = list(self.core.agents)
        self.agents: list[str] = []
        lo = np.zeros(self.core.obs_dim, np.float32)
        hi = np.ones(self.core.obs_dim, np.float32)
        lo[4], hi[4] = SENSOR_RANGE
        self._obs_space = spaces.Box(lo, hi, dtype=np.float32)
        self._act_space = spaces.Discrete(N_ACTIONS)
        slo = np.concatenate([np.tile(lo, self.core.n_agents), [0.0]]).astype(np.float32)
        shi = np.concatenate([np.tile(hi, self.core.n_agents), [1.0]]).astype(np.float32)
        self.state_space = spaces.Box(slo, shi, dtype=np.float32)
        self.render_mode = None

    def observation_space(self, agent: str) -> Any:
        return self._obs_space

    def action_space(self, agent: str) -> Any:
        return self._act_space

    @property
    def num_agents(self) -> int:
        return len(self.agents)

    @property
    def max_num_agents(self) -> int:
        return len(self.possible_agents)

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        obs, _ = self.core.reset(seed)
        self.agents = list(self.possible_agents)
        return ({a: obs[0, k] for k, a in enumerate(self.agents)}, {a: {} for a in self.agents})

    def step(self, actions: dict[str, int]) -> tuple[dict, dict, dict, dict, dict]:
        if not self.agents:
            raise ConfigError("the episode has ended; call reset()")
        missing = [a for a in self.agents if a not in actions]
        if missing:
            raise ConfigError(f"no action for {', '.join(missing)}")
        a = np.array([[int(actions[ag]) for ag in self.possible_agents]], np.int64)
        obs, _, reward, cost, done, info = self.core.step(a)
        names = self.possible_agents
        o = {ag: obs[0, k] for k, ag in enumerate(names)}
        r = {ag: float(reward[0]) for ag in names}
        term = {ag: False for ag in names}
        trunc = {ag: bool(done[0]) for ag in names}
        infos = {ag: {"cost": float(cost[0, k]), "granted": bool(info["granted"][0, k]),
                      "denied": bool(info["denied"][0, k])} for k, ag in enumerate(names)}
        if done[0]:
            self.agents = []
        return o, r, term, trunc, infos

    def state(self) -> np.ndarray:
        return self.core.state()[0]

    def render(self) -> None:
        return None

    def close(self) -> None:
        return None


# -- team policies -------------------------------------------------------------------------


class HeuristicTeamPolicy:
    """The baseline team policy: a kanban line with condition-based maintenance, per station.

    * ``MAINTAIN`` when the station is up, its *current* wear sensor reads above ``threshold`` and
      the crew is free (the reading is noisy: this is the rule a memory would improve on);
    * else ``WORK`` when its output buffer is below its target (``wip_target`` units for inner
      buffers, ``fg_target`` for finished goods), or when the last station sees a backlog;
    * else ``IDLE``.

    Defaults were the best of a grid on training seeds (``cogbert-bench marl`` re-tunes them and
    prints the grid's winner); evaluation seeds are disjoint from tuning seeds.
    """

    def __init__(self, config: ProductionLineConfig, *, threshold: float = 1.2, wip_target: int = 4,
                 fg_target: int = 8) -> None:
        self.config, self.threshold, self.wip_target, self.fg_target = config, threshold, wip_target, fg_target

    def act(self, obs: np.ndarray) -> np.ndarray:
        cfg = self.config
        K = cfg.stations
        o = np.asarray(obs)
        up = (o[..., 2] == 0) & (o[..., 3] == 0)
        maintain = up & (o[..., 4] > self.threshold) & (o[..., 5] > 0)
        target = np.full(K, self.wip_target / cfg.buffer_capacity)
        target[-1] = self.fg_target / cfg.fg_capacity
        work = (o[..., 1] < target - 1e-9) | ((np.arange(K) == K - 1) & (o[..., 6] > 0) & (o[..., 1] < 1.0))
        return np.where(maintain, MAINTAIN, np.where(work, WORK, IDLE)).astype(np.int64)


class RandomTeamPolicy:
    """Each station picks uniformly among its actions every period (a yardstick)."""

    def __init__(self, config: ProductionLineConfig, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.rng.integers(0, N_ACTIONS, size=np.asarray(obs).shape[:-1])


def evaluate_team(policy: Any, episodes: int, seed: int, config: ProductionLineConfig | None = None) -> np.ndarray:
    """Team return (undiscounted sum of the team reward) of each episode, line ``i`` seeded
    ``seed + i``; ``policy.act(obs [N, K, 9]) -> actions [N, K]``."""
    env = ProductionLineVecEnv(episodes, config=config)
    obs, _ = env.reset(seed)
    total = np.zeros(episodes)
    for _ in range(env.episode_length):
        obs, _, r, _, _, _ = env.step(policy.act(obs))
        total += r
    return total
