"""Bounds of continuous actions: the tanh squash between the model's Gaussian and the actuator.

A continuous model's head is a diagonal Gaussian over an *unbounded* ``u``. When the bundle's
metadata has ``x-action-bounds`` (``{"mode": "squash", "low": [...], "high": [...]}``), the
action a device applies is

    a = mid + half * tanh(u),   mid = (high + low) / 2,   half = (high - low) / 2

and the behaviour log-probability reported with it is the density of that applied ``a``
(change of variables), not of ``u``:

    log p(a) = log N(u; mean, std) - sum_d [log half_d + log(1 - tanh(u_d)^2)]

so the experience a device logs (the action it applied and that action's probability) is
what off-policy evaluation and V-trace need. A deterministic decision applies
``mid + half * tanh(mean)``. Squashing (rather than clipping) keeps ``a -> u`` invertible, so a
learner can recover ``u`` from a logged action (:meth:`ActionBounds.unsquash`).

The C runtime returns the pre-bound Gaussian sample ``u`` and its Gaussian log-probability; a
C application applies the two formulas above itself (``docs/training.md``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cogbert_edge.errors import BundleError

__all__ = ["ActionBounds", "BOUNDS_KEY"]

BOUNDS_KEY = "x-action-bounds"
_LOG2 = float(np.log(2.0))
# Logged actions at (or numerically beyond) a bound map to |tanh u| = 1 - 1e-6, not infinity.
_EDGE = 1.0 - 1e-6


@dataclass(frozen=True)
class ActionBounds:
    """Finite per-dimension bounds ``[low, high]`` of a continuous action, applied by squashing."""

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        if low.ndim != 1 or low.shape != high.shape or not (np.isfinite(low).all() and np.isfinite(high).all()) \
                or not (high > low).all():
            raise BundleError(f"action bounds need finite low < high of one shape, got {self.low} and {self.high}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @property
    def mid(self) -> np.ndarray:
        return (self.high + self.low) / 2.0

    @property
    def half(self) -> np.ndarray:
        return (self.high - self.low) / 2.0

    # -- metadata ------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({"mode": "squash", "low": self.low.tolist(), "high": self.high.tolist()})

    def metadata(self) -> dict[str, str]:
        return {BOUNDS_KEY: self.to_json()}

    @classmethod
    def from_extra(cls, extra: Mapping[str, str], size: int) -> ActionBounds | None:
        """The bounds a bundle's ``x-`` metadata declares for ``size`` action dimensions, or None."""
        raw = extra.get(BOUNDS_KEY)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            ok = isinstance(d, dict) and d.get("mode") == "squash"
            low, high = np.asarray(d["low"], np.float64), np.asarray(d["high"], np.float64)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok or low.shape != (size,) or high.shape != (size,):
            raise BundleError(f"{BOUNDS_KEY} must be {{'mode': 'squash', 'low': [{size} numbers], "
                              f"'high': [{size} numbers]}}, got {raw[:120]!r}")
        return cls(low, high)

    # -- the transform -------------------------------------------------------------------------

    def squash(self, u: np.ndarray) -> np.ndarray:
        """The applied action for the Gaussian sample(s) ``u [..., size]``."""
        return (self.mid + self.half * np.tanh(np.asarray(u, np.float64))).astype(np.float32)

    def log_det(self, u: np.ndarray) -> np.ndarray:
        """``sum_d log |da_d / du_d|`` at ``u`` (stable for large ``|u|``)."""
        u = np.asarray(u, np.float64)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        log_1m_t2 = 2.0 * (_LOG2 - u - np.logaddexp(0.0, -2.0 * u))
        return (np.log(self.half) + log_1m_t2).sum(axis=-1)

    def apply(self, u: np.ndarray, gauss_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(a, log p(a))`` from a Gaussian sample and its Gaussian log-probability."""
        return self.squash(u), np.asarray(gauss_logp, np.float64) - self.log_det(u)

    def unsquash(self, a: np.ndarray) -> np.ndarray:
        """The ``u`` whose squash is ``a`` (logged actions at a bound map just inside it)."""
        t = np.clip((np.asarray(a, np.float64) - self.mid) / self.half, -_EDGE, _EDGE)
        return np.arctanh(t).astype(np.float32)
