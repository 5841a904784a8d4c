"""The parameters of ``ProductionChain-v0``: one typed, validated, immutable dataclass.

Defaults are the registered environment. ``docs/production-chain.md`` has the table of
parameters with units and the reasons behind the defaults.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cogbert_edge.errors import ConfigError

__all__ = ["ProductionChainConfig"]


@dataclass(frozen=True)
class ProductionChainConfig:
    """Parameters of a production line. Time is in periods (one ``step``); money in currency
    units before ``reward_scale``; wear is dimensionless (hazard ``hazard_base`` at 0)."""

    stations: int = 3
    episode_length: int = 256
    # Per-station probability of completing the unit in process in one period (geometric
    # processing times); the middle station is the bottleneck.
    process_prob: tuple[float, ...] = (0.85, 0.75, 0.90)
    buffer_capacity: int = 6          # each station's input buffer (B_0: released raw material)
    fg_capacity: int = 12             # finished goods; the last station blocks when it is full
    backlog_capacity: int = 12        # orders beyond it are lost
    demand_low: float = 0.25          # Poisson mean arrivals per period, low regime
    demand_high: float = 0.6          # and high regime
    p_low_to_high: float = 0.02       # regime switch probabilities per period
    p_high_to_low: float = 0.025
    demand_max: int = 3               # arrivals per period are capped here
    wear_rate: float = 0.015          # mean wear added per busy period (exponential increments)
    hazard_base: float = 0.0005       # breakdown probability per busy period at wear 0
    hazard_slope: float = 0.2         # ... plus hazard_slope * wear**hazard_power
    hazard_power: float = 2.0
    repair_prob: float = 0.06         # per period, probability that a broken station is repaired
    maint_periods: int = 4            # preventive maintenance keeps a station down this long
    sensor_noise: float = 0.5         # std of the Gaussian noise on the wear sensor
    initial_wear: float = 0.6         # initial wear is uniform in [0, initial_wear]
    price: float = 15.0               # revenue per unit shipped
    hold_wip: float = 0.1             # per unit in a station buffer, per period
    hold_fg: float = 0.2              # per unit of finished goods, per period
    backlog_cost: float = 1.0         # per backlogged order, per period (lateness)
    lost_sale_cost: float = 2.0       # per order lost (on top of the revenue never made)
    downtime_cost: float = 4.0        # per broken station, per period
    maint_cost: float = 1.0           # per station in maintenance, per period
    breakdown_cost: float = 5.0       # per breakdown
    reward_scale: float = 0.1         # reward = reward_scale * (revenue - costs)

    def __post_init__(self) -> None:
        if not isinstance(self.process_prob, tuple):
            object.__setattr__(self, "process_prob", tuple(self.process_prob))
        for name in ("stations", "episode_length", "buffer_capacity", "fg_capacity",
                     "backlog_capacity", "demand_max", "maint_periods"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if len(self.process_prob) != self.stations:
            raise ConfigError(f"process_prob needs one value per station ({self.stations}), "
                              f"got {len(self.process_prob)}")
        probs = ("p_low_to_high", "p_high_to_low", "hazard_base", "repair_prob")
        for name in probs:
            _check(name, getattr(self, name), 0.0, 1.0)
        for p in self.process_prob:
            _check("process_prob", p, 0.0, 1.0)
        if self.p_low_to_high + self.p_high_to_low <= 0:
            raise ConfigError("the demand regime must be able to switch one way or the other")
        for f in dataclasses.fields(self):
            if f.name not in probs and f.type == "float":
                _check(f.name, getattr(self, f.name), 0.0, math.inf)

    def replace(self, **changes: Any) -> ProductionChainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def reward_bounds(self) -> tuple[float, float]:
        """Bounds of one step's reward: the most a step can earn and the most it can cost.

        At most ``demand_max`` units ship in a period: with a backlog, FG was empty at the
        start of the period and gains at most one unit; without one, shipments are arrivals.
        A station is either broken (and may just have broken down) or in maintenance.
        """
        k = self.stations
        worst = (self.hold_wip * k * self.buffer_capacity + self.hold_fg * self.fg_capacity
                 + self.backlog_cost * self.backlog_capacity + self.lost_sale_cost * self.demand_max
                 + max(self.downtime_cost + self.breakdown_cost, self.maint_cost) * k)
        return -self.reward_scale * worst, self.reward_scale * self.price * self.demand_max


def _check(name: str, v: Any, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
