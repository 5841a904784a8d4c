"""The Policy API device applications call: load a bundle, keep state per session, decide.

    policy = Policy.load("model.safetensors")
    state = policy.initial_state()
    d = policy.act(obs, state)          # d.action, d.log_prob, d.value, d.state
    state = d.state

The policy's weights are immutable and it keeps no per-session data: the caller owns every
:class:`State` and passes it in; ``act`` never modifies its arguments. One policy can
therefore serve many sessions from many threads at once.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from cogbert_edge.errors import ConfigError, ObservationError
from cogbert_edge.inference.backends import create_backend
from cogbert_edge.inference.bounds import ActionBounds
from cogbert_edge.inference.bundle import Bundle, load_bundle
from cogbert_edge.inference.model import LOG_2PI, ModelConfig

__all__ = ["Policy", "State", "Decision", "INVALID_OBS_POLICIES"]

INVALID_OBS_POLICIES = ("raise", "sanitize")
_FLOAT_KINDS = "fiu"
_SCALAR_SAMPLING_MAX = 32  # float, signed and unsigned integers; not bool, complex, object, str


@dataclass(frozen=True)
class State:
    """Recurrent state of one session (``h, c [hidden]``) or of a batch (``[B, hidden]``)."""

    h: np.ndarray
    c: np.ndarray

    @property
    def batch(self) -> int | None:
        return None if self.h.ndim == 1 else self.h.shape[0]


@dataclass(frozen=True)
class Decision:
    """The result of :meth:`Policy.act` (scalars) or :meth:`Policy.act_batch` (arrays).

    ``log_prob`` is the behaviour log-probability of ``action``: the log-probability under the
    distribution that actually chose it. A deterministic decision reports 0.0 (probability 1).
    """

    action: Any
    log_prob: Any
    value: Any
    state: State


def _sample_small(logits: list[float], rng: np.random.Generator) -> tuple[int, float]:
    """Sample one discrete action from a short list of logits; returns ``(action, log_prob)``.

    The same inverse-CDF rule as :meth:`Policy._choose`, in plain Python floats: for a few
    actions that is several times faster than a dozen numpy calls on tiny arrays.
    """
    m = max(logits)
    weights = [math.exp(v - m) for v in logits]
    total = math.fsum(weights)
    u = rng.random() * total
    acc = 0.0
    a = len(weights) - 1
    for i, w in enumerate(weights):
        acc += w
        if u < acc:
            a = i
            break
    return a, logits[a] - m - math.log(total)


class Policy:
    """A loaded model on one backend.

    ``invalid_obs`` decides what happens to observations holding NaN or Inf:
    ``"raise"`` (default) raises :class:`ObservationError`; ``"sanitize"`` replaces NaN by the
    normalizer's mean and +/-Inf by ``mean +/- clip * std`` (``clip`` is the bundle's
    ``obs_clip``, or 10 when clipping is off), counts it in ``sanitized``, and decides.
    """

    def __init__(self, bundle: Bundle, backend: str | None = None, *,
                 invalid_obs: str = "raise", seed: int | None = None) -> None:
        if invalid_obs not in INVALID_OBS_POLICIES:
            raise ConfigError(f"invalid_obs must be one of {INVALID_OBS_POLICIES}, got {invalid_obs!r}")
        self.bundle = bundle
        self.config: ModelConfig = bundle.config
        self._backend = create_backend(bundle, backend)
        self.invalid_obs = invalid_obs
        cfg = self.config
        self._rng = np.random.default_rng(seed)
        self._sanitize_lock = threading.Lock()
        self.sanitized = 0
        self._obs_dim = cfg.obs_dim
        self._hidden = cfg.hidden
        self._discrete = cfg.action.discrete
        # A backend may take a whole discrete decision in one call (the native one does): the
        # same step and sampling rule as below, without a dozen small numpy operations.
        # ``act`` returns a finished Decision, ``decide`` its parts; None means "not here".
        fast = self._discrete and cfg.action.size <= _SCALAR_SAMPLING_MAX
        self._fast_decision = getattr(self._backend, "act", None) if fast else None
        self._fast_act = getattr(self._backend, "decide", None) if fast else None
        # And a whole batch of discrete decisions: ``act_batch`` returns the Decision's parts,
        # sampled per row by the single-decision rule (so a row equals ``act`` on it alone).
        self._fast_batch = getattr(self._backend, "act_batch", None) if self._discrete else None
        norm_mean = np.asarray(bundle.tensors["obs_norm.mean"], np.float32)
        norm_std = np.asarray(bundle.tensors["obs_norm.std"], np.float32)
        bound = cfg.obs_clip if cfg.obs_clip > 0 else 10.0
        self._nan_fill = norm_mean
        self._lo, self._hi = norm_mean - bound * norm_std, norm_mean + bound * norm_std
        if not self._discrete:
            self._log_std = np.asarray(bundle.tensors["policy.log_std"], np.float32)
            self._std = np.exp(self._log_std)
            self._gauss_const = float(-(self._log_std.sum() + 0.5 * LOG_2PI * cfg.action.size))
        # --- continuous action bounds (owned by the training side; see inference/bounds.py) ---
        # A bundle with x-action-bounds gets its Gaussian samples squashed into the bounds, and
        # reports the log-density of the action it returns (the one the device applies).
        self.action_bounds: ActionBounds | None = (
            None if self._discrete else ActionBounds.from_extra(bundle.extra, cfg.action.size))
        # --- end of continuous action bounds ---

    @classmethod
    def load(cls, source: str | os.PathLike | bytes, backend: str | None = None, *,
             invalid_obs: str = "raise", seed: int | None = None) -> Policy:
        """Load and validate a bundle (path or bytes) and put it on ``backend``: a name
        (``native``, ``numpy``, ``mlx``), ``auto`` (the fastest here), or None (the default:
        ``$COGBERT_BACKEND`` if set, else ``auto``)."""
        return cls(load_bundle(source), backend, invalid_obs=invalid_obs, seed=seed)

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    def initial_state(self, batch: int | None = None) -> State:
        """Zero state for a new session, or for ``batch`` sessions at once."""
        shape = (self._hidden,) if batch is None else (batch, self._hidden)
        return State(np.zeros(shape, np.float32), np.zeros(shape, np.float32))

    def act(self, obs: Any, state: State, *, deterministic: bool = False,
            rng: np.random.Generator | None = None) -> Decision:
        """One decision for one session. ``obs`` has shape ``[obs_dim]``."""
        if self._fast_decision is not None:
            d = self._fast_decision(obs, state, deterministic, rng or self._rng)
            if d is not None:  # None: unusual input, which the checks below handle
                return d
        elif self._fast_act is not None and type(state) is State:
            fast = self._fast_act(obs, state.h, state.c, deterministic, rng or self._rng)
            if fast is not None:
                a, logp, value, h2, c2 = fast
                return Decision(a, logp, value, State(h2, c2))
        x = self._check_obs(obs, single=True)
        h, c = self._check_state(state, None)
        head, value, h2, c2 = self._backend.step(x, h[None, :], c[None, :])
        if self._discrete and not deterministic and head.shape[1] <= _SCALAR_SAMPLING_MAX:
            a, logp = _sample_small(head[0].tolist(), rng or self._rng)
            return Decision(a, logp, float(value[0]), State(h2[0], c2[0]))
        action, logps = self._choose(head, deterministic, rng)
        a = int(action[0]) if self._discrete else action[0]
        return Decision(a, float(logps[0]), float(value[0]), State(h2[0], c2[0]))

    def act_batch(self, obs: Any, state: State, *, deterministic: bool = False,
                  rng: np.random.Generator | None = None) -> Decision:
        """Decisions for ``B`` sessions at once. ``obs [B, obs_dim]``, ``state`` of batch ``B``."""
        if self._fast_batch is not None and type(state) is State:
            fast = self._fast_batch(obs, state.h, state.c, deterministic, rng or self._rng)
            if fast is not None:  # None: unusual input, which the checks below handle
                a, logp, value, h2, c2 = fast
                return Decision(a, logp, value, State(h2, c2))
        x = self._check_obs(obs, single=False)
        h, c = self._check_state(state, x.shape[0])
        head, value, h2, c2 = self._backend.step(x, h, c)
        action, logp = self._choose(head, deterministic, rng)
        return Decision(action, logp, value, State(h2, c2))

    def step(self, obs: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """The model's raw step for a batch, without sampling: ``(head, value, state)``."""
        x = self._check_obs(obs, single=False)
        h, c = self._check_state(state, x.shape[0])
        head, value, h2, c2 = self._backend.step(x, h, c)
        return head, value, State(h2, c2)

    # -- internals ------------------------------------------------------------------------

    def _choose(self, head: np.ndarray, deterministic: bool,
                rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        n = head.shape[0]
        if deterministic:
            action = head.argmax(axis=-1) if self._discrete else head.copy()
            if self.action_bounds is not None:   # continuous action bounds
                action = self.action_bounds.squash(action)
            return action, np.zeros(n, np.float64)
        rng = rng or self._rng
        if self._discrete:
            # Inverse-CDF sampling on unnormalised probabilities: one exp, one cumsum.
            m = head.max(axis=-1, keepdims=True)
            cdf = np.exp(head - m).cumsum(axis=-1)
            total = cdf[:, -1:]
            u = rng.random((n, 1)) * total
            action = np.minimum((cdf < u).sum(axis=-1), head.shape[1] - 1)
            logp = head[np.arange(n), action] - (m + np.log(total))[:, 0]
            return action, logp.astype(np.float64)
        noise = rng.standard_normal(head.shape).astype(np.float32)
        action = head + self._std * noise
        logp = (-0.5 * (noise * noise).sum(axis=-1) + self._gauss_const).astype(np.float64)
        if self.action_bounds is not None:   # continuous action bounds: the applied action's density
            return self.action_bounds.apply(action, logp)
        return action, logp

    def _check_obs(self, obs: Any, *, single: bool) -> np.ndarray:
        try:
            x = np.asarray(obs)
        except (ValueError, TypeError) as e:
            raise ObservationError(f"observation is not an array of numbers: {e}") from None
        if x.dtype.kind not in _FLOAT_KINDS:
            raise ObservationError(f"observation dtype {x.dtype} is not a real number type; "
                                   "pass float32 (other float and integer types are converted)")
        want = "[obs_dim]" if single else "[batch, obs_dim]"
        if x.ndim != (1 if single else 2) or x.shape[-1] != self._obs_dim or x.size == 0:
            raise ObservationError(f"observation shape {x.shape} is not {want} with obs_dim {self._obs_dim}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            x = self._invalid(x)
        return x[None, :] if single else x

    def _invalid(self, x: np.ndarray) -> np.ndarray:
        if self.invalid_obs == "raise":
            bad = np.argwhere(~np.isfinite(x))[:4].tolist()
            raise ObservationError(f"observation holds NaN or Inf at {bad}; fix the sensor data, or "
                                   "load the policy with invalid_obs='sanitize'")
        with self._sanitize_lock:
            self.sanitized += 1
        x = np.where(np.isnan(x), self._nan_fill, x)
        x = np.where(x == np.inf, self._hi, x)
        return np.where(x == -np.inf, self._lo, x).astype(np.float32)

    def _check_state(self, state: State, batch: int | None) -> tuple[np.ndarray, np.ndarray]:
        want = (self._hidden,) if batch is None else (batch, self._hidden)
        if not isinstance(state, State):
            raise ObservationError(f"state must be a cogbert_edge.State, got {type(state).__name__}")
        h, c = state.h, state.c
        if h.shape != want or c.shape != want:
            raise ObservationError(f"state shape {h.shape} does not match {want}; "
                                   "use policy.initial_state() for this batch size")
        if h.dtype != np.float32 or c.dtype != np.float32:
            h, c = h.astype(np.float32), c.astype(np.float32)
        return h, c
