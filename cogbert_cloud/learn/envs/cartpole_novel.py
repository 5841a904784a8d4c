"""CartPole without velocities (``CartPoleNoVel-v1``): the recurrent-policy sanity check.

Gymnasium's ``CartPole-v1`` dynamics, vectorised with numpy, observing only the cart
position and the pole angle (indices 0 and 2 of CartPole's state). A memoryless policy cannot
tell which way the pole is moving; a recurrent one can difference successive observations.
rl-zoo3's ``CartPoleNoVel-v1`` zeroes the velocity entries instead of dropping them (its
observations keep 4 dimensions, two always 0); the information is the same.

Everything else is CartPole-v1's: the constants, explicit Euler integration in float64,
termination when ``|x| > 2.4`` or ``|theta| > 12 degrees``, truncation after 500 steps,
reward 1 for every step including the one that terminates, and the initial state uniform in
``[-0.05, 0.05]^4`` drawn from the instance's generator exactly as ``CartPoleEnv.reset``
draws it, so a seeded :class:`CartPoleNoVelEnv` follows Gymnasium's ``CartPole-v1`` with the
same seed and actions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from gymnasium import spaces

from cogbert_cloud.learn.envs.vector import NumpyVecEnv, SingleEnv

__all__ = ["CartPoleVecEnv", "CartPoleNoVelVecEnv", "CartPoleNoVelEnv", "CARTPOLE_MAX_STEPS"]

CARTPOLE_MAX_STEPS = 500
GRAVITY = 9.8
MASSCART = 1.0
MASSPOLE = 0.1
TOTAL_MASS = MASSPOLE + MASSCART
LENGTH = 0.5  # half the pole's length
POLEMASS_LENGTH = MASSPOLE * LENGTH
FORCE_MAG = 10.0
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
_FULL_HIGH = np.array([X_THRESHOLD * 2, np.inf, THETA_THRESHOLD * 2, np.inf], np.float32)
_NOVEL = np.array([0, 2])


class CartPoleVecEnv(NumpyVecEnv):
    """CartPole-v1 for ``num_envs`` instances; ``observe`` picks the state entries observed.

    The full state (``observe=(0, 1, 2, 3)``) is CartPole-v1 itself and is what the parity
    test holds to Gymnasium; :class:`CartPoleNoVelVecEnv` observes ``(0, 2)``.
    """

    def __init__(self, num_envs: int = 1, seed: int | None = None, *, autoreset: bool = True,
                 observe: tuple[int, ...] = (0, 1, 2, 3),
                 max_episode_steps: int = CARTPOLE_MAX_STEPS) -> None:
        super().__init__(num_envs, seed, autoreset=autoreset)
        self._observe = np.asarray(observe)
        high = _FULL_HIGH[self._observe]
        self._init_spaces(spaces.Box(-high, high, dtype=np.float32), spaces.Discrete(2))
        self.max_episode_steps = int(max_episode_steps)
        self.state = np.zeros((num_envs, 4))  # x, x_dot, theta, theta_dot (float64)
        self._steps = np.zeros(num_envs, np.int64)
        # Initial states are drawn a block at a time per instance: a Generator's doubles come
        # out in the same order whether drawn 4 or 4 * 64 at a time, so this is Gymnasium's
        # stream, without a Python call per reset.
        self._pool = np.zeros((num_envs, self._POOL, 4))
        self._pool_pos = np.full(num_envs, self._POOL, np.int64)

    _POOL = 64

    def set_rngs(self, rngs: Sequence[np.random.Generator]) -> None:
        # Pooled draws belong to the generator that made them: a new generator starts afresh.
        for i, rng in enumerate(rngs):
            if i >= len(self._rngs) or rng is not self._rngs[i]:
                self._pool_pos[i] = self._POOL
        super().set_rngs(rngs)

    def _reset_rows(self, rows: np.ndarray) -> None:
        empty = rows[self._pool_pos[rows] >= self._POOL]
        for i in empty:
            self._pool[i] = self._rngs[i].uniform(-0.05, 0.05, size=(self._POOL, 4))
        self._pool_pos[empty] = 0
        self.state[rows] = self._pool[rows, self._pool_pos[rows]]
        self._pool_pos[rows] += 1
        self._steps[rows] = 0
        self._obs[rows] = self.state[rows][:, self._observe]

    def _step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.state
        x, x_dot, theta, theta_dot = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
        force = np.where(actions == 1, FORCE_MAG, -FORCE_MAG)
        costheta = np.cos(theta)
        sintheta = np.sin(theta)
        # The same expression order as Gymnasium's CartPoleEnv.step, for bitwise parity.
        temp = (force + POLEMASS_LENGTH * np.square(theta_dot) * sintheta) / TOTAL_MASS
        thetaacc = (GRAVITY * sintheta - costheta * temp) / (
            LENGTH * (4.0 / 3.0 - MASSPOLE * np.square(costheta) / TOTAL_MASS))
        xacc = temp - POLEMASS_LENGTH * thetaacc * costheta / TOTAL_MASS
        new = np.stack((x + TAU * x_dot, x_dot + TAU * xacc,
                        theta + TAU * theta_dot, theta_dot + TAU * thetaacc), axis=1)
        self.state = new
        terminated = ((new[:, 0] < -X_THRESHOLD) | (new[:, 0] > X_THRESHOLD)
                      | (new[:, 2] < -THETA_THRESHOLD) | (new[:, 2] > THETA_THRESHOLD))
        self._steps += 1
        # As Gymnasium's TimeLimit: the 500th step is truncated even if it also terminates.
        truncated = self._steps >= self.max_episode_steps
        self._obs[:] = new[:, self._observe]
        return np.ones(self.num_envs), terminated, truncated


class CartPoleNoVelVecEnv(CartPoleVecEnv):
    """``CartPoleNoVel-v1`` for ``num_envs`` instances: observation ``[x, theta]``."""

    def __init__(self, num_envs: int = 1, seed: int | None = None, *, autoreset: bool = True,
                 max_episode_steps: int = CARTPOLE_MAX_STEPS) -> None:
        super().__init__(num_envs, seed, autoreset=autoreset, observe=tuple(_NOVEL),
                         max_episode_steps=max_episode_steps)


class CartPoleNoVelEnv(SingleEnv):
    """``CartPoleNoVel-v1`` as a ``gymnasium.Env`` (the 500-step limit is built in)."""

    def __init__(self) -> None:
        super().__init__(CartPoleNoVelVecEnv(1, autoreset=False))
