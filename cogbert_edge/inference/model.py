"""The Cogbert model: an LSTM actor-critic, defined once for every backend and for training.

    obs -> standardize + clip -> [Linear + ReLU] x len(encoder) -> LSTM cell -> policy head
                                                                            \\-> value head

The forward pass is written against a small math namespace ``F`` (see :class:`Math`) instead
of a concrete array library, so that numpy (the reference backend), MLX (inference with
quantized matmuls, and training with autodiff) run literally the same code. A backend only
decides how ``F.linear`` multiplies (fp32, dequantized, ``mx.quantized_matmul``) and how it
lays its weights out.

Parameters are a flat mapping from tensor name to array; the names are the bundle's names
(``encoder.0.weight``, ``lstm.ih.weight``, ...), see ``docs/bundle-format.md``. The LSTM is
written as two linear layers, ``lstm.ih`` (input to gates, with bias) and ``lstm.hh``
(hidden to gates, no bias), so that quantization treats it like every other layer. Gates are
stacked in the order input, forget, cell, output (PyTorch's and MLX's order).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cogbert_edge.errors import ConfigError

__all__ = [
    "ActionSpace",
    "ModelConfig",
    "LayerSpec",
    "Math",
    "NumpyMath",
    "ARCHITECTURE",
    "LOG_2PI",
    "init_params",
    "encode",
    "lstm_cell",
    "heads",
    "step",
    "sequence",
    "log_prob",
    "entropy",
]

ARCHITECTURE = "lstm-ac"
LOG_2PI = math.log(2.0 * math.pi)

# Upper bounds on every dimension. They exist so that a hostile bundle header cannot make a
# loader plan absurd allocations; real edge models are orders of magnitude smaller.
MAX_DIM = 65536
MAX_ENCODER_LAYERS = 8


@dataclass(frozen=True)
class ActionSpace:
    """Either ``discrete`` with ``size`` actions, or ``continuous`` with ``size`` dimensions.

    A continuous space has a diagonal Gaussian head: the policy layer gives the mean and a
    state-independent ``policy.log_std`` tensor the log standard deviation.
    """

    kind: str
    size: int

    def __post_init__(self) -> None:
        if self.kind not in ("discrete", "continuous"):
            raise ConfigError(f"action kind must be 'discrete' or 'continuous', got {self.kind!r}")
        _check_dim("action size", self.size)

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"

    @classmethod
    def of_discrete(cls, n: int) -> ActionSpace:
        return cls("discrete", n)

    @classmethod
    def of_continuous(cls, dim: int) -> ActionSpace:
        return cls("continuous", dim)


@dataclass(frozen=True)
class LayerSpec:
    """One linear layer of the model: ``y = x @ weight.T (+ bias)``, weight ``[out, in]``."""

    name: str
    in_dim: int
    out_dim: int
    has_bias: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Cogbert model. Everything a backend needs to lay out and run it.

    ``obs_clip`` bounds standardized observations to ``[-obs_clip, obs_clip]``; 0 disables it.
    """

    obs_dim: int
    action: ActionSpace
    encoder: tuple[int, ...] = (256,)
    hidden: int = 256
    obs_clip: float = 10.0

    def __post_init__(self) -> None:
        _check_dim("obs_dim", self.obs_dim)
        _check_dim("hidden", self.hidden)
        if not isinstance(self.encoder, tuple):
            object.__setattr__(self, "encoder", tuple(self.encoder))
        if len(self.encoder) > MAX_ENCODER_LAYERS:
            raise ConfigError(f"at most {MAX_ENCODER_LAYERS} encoder layers, got {len(self.encoder)}")
        for width in self.encoder:
            _check_dim("encoder width", width)
        if not isinstance(self.action, ActionSpace):
            raise ConfigError("action must be an ActionSpace")
        clip = self.obs_clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
            raise ConfigError(f"obs_clip must be a finite number >= 0, got {clip!r}")
        object.__setattr__(self, "obs_clip", float(clip))

    @classmethod
    def reference(cls) -> ModelConfig:
        """The reference model every benchmark uses: obs 64, Linear 256, LSTM 256, 8 actions."""
        return cls(obs_dim=64, action=ActionSpace.of_discrete(8), encoder=(256,), hidden=256)

    @property
    def lstm_in(self) -> int:
        return self.encoder[-1] if self.encoder else self.obs_dim

    @property
    def head_dim(self) -> int:
        return self.action.size

    def layers(self) -> list[LayerSpec]:
        """Every linear layer in forward order."""
        specs = []
        width = self.obs_dim
        for i, out in enumerate(self.encoder):
            specs.append(LayerSpec(f"encoder.{i}", width, out))
            width = out
        h4 = 4 * self.hidden
        specs.append(LayerSpec("lstm.ih", width, h4, has_bias=True))
        specs.append(LayerSpec("lstm.hh", self.hidden, h4, has_bias=False))
        specs.append(LayerSpec("policy", self.hidden, self.action.size))
        specs.append(LayerSpec("value", self.hidden, 1))
        return specs

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every fp32 parameter (before any quantization)."""
        shapes: dict[str, tuple[int, ...]] = {
            "obs_norm.mean": (self.obs_dim,),
            "obs_norm.std": (self.obs_dim,),
        }
        for layer in self.layers():
            shapes[f"{layer.name}.weight"] = (layer.out_dim, layer.in_dim)
            if layer.has_bias:
                shapes[f"{layer.name}.bias"] = (layer.out_dim,)
        if not self.action.discrete:
            shapes["policy.log_std"] = (self.action.size,)
        return shapes

    def macs_per_step(self) -> int:
        """Multiply-adds of one single-observation step (the arithmetic floor of a decision)."""
        return sum(layer.in_dim * layer.out_dim for layer in self.layers())

    # -- (de)serialization: the ``config`` entry of a bundle's metadata ------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "encoder": list(self.encoder),
            "hidden": self.hidden,
            "action": {"kind": self.action.kind, "size": self.action.size},
        }

    @classmethod
    def from_dict(cls, d: Any, *, obs_clip: float = 10.0) -> ModelConfig:
        """Strict inverse of :meth:`to_dict`: unknown or missing keys and wrong types raise."""
        _expect_keys("config", d, {"obs_dim", "encoder", "hidden", "action"})
        _expect_keys("config.action", d["action"], {"kind", "size"})
        encoder = d["encoder"]
        if not isinstance(encoder, list):
            raise ConfigError("config.encoder must be a list of integers")
        return cls(
            obs_dim=_int("config.obs_dim", d["obs_dim"]),
            encoder=tuple(_int("config.encoder[]", w) for w in encoder),
            hidden=_int("config.hidden", d["hidden"]),
            action=ActionSpace(_str("config.action.kind", d["action"]["kind"]),
                               _int("config.action.size", d["action"]["size"])),
            obs_clip=obs_clip,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


def _check_dim(what: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM:
        raise ConfigError(f"{what} must be an integer in [1, {MAX_DIM}], got {v!r}")


def _expect_keys(what: str, d: Any, keys: set[str]) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object")
    if set(d) != keys:
        missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
        raise ConfigError(f"{what}: missing keys {missing}, unexpected keys {extra}")


def _int(what: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{what} must be an integer, got {type(v).__name__}")
    return v


def _str(what: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {type(v).__name__}")
    return v


# -- initialisation ---------------------------------------------------------------------------


def _orthogonal(rng: np.random.Generator, shape: tuple[int, int], gain: float) -> np.ndarray:
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))  # make the decomposition unique, as torch.nn.init.orthogonal_ does
    if rows < cols:
        q = q.T
    return (gain * q[:rows, :cols]).astype(np.float32)


def init_params(config: ModelConfig, seed: int = 0, *, policy_gain: float = 0.01) -> dict[str, np.ndarray]:
    """Randomly initialised fp32 parameters, the PPO way (orthogonal weights, zero biases).

    Hidden layers use gain sqrt(2), the LSTM gain 1, the value head 1 and the policy head
    ``policy_gain`` (0.01 keeps the first policy close to uniform, which PPO wants).
    The observation normalizer starts as the identity (mean 0, std 1).
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {
        "obs_norm.mean": np.zeros(config.obs_dim, np.float32),
        "obs_norm.std": np.ones(config.obs_dim, np.float32),
    }
    gains = {"policy": policy_gain, "value": 1.0, "lstm.ih": 1.0, "lstm.hh": 1.0}
    for layer in config.layers():
        gain = gains.get(layer.name, math.sqrt(2.0))
        params[f"{layer.name}.weight"] = _orthogonal(rng, (layer.out_dim, layer.in_dim), gain)
        if layer.has_bias:
            params[f"{layer.name}.bias"] = np.zeros(layer.out_dim, np.float32)
    if not config.action.discrete:
        params["policy.log_std"] = np.zeros(config.action.size, np.float32)
    return params


# -- the forward pass, generic over the array library ----------------------------------------


class Math(Protocol):
    """What the forward pass needs from an array library plus the backend's weights.

    ``linear(name, x)`` computes ``x @ W.T + b`` for the layer called ``name`` (no ``+ b``
    for ``lstm.hh``); ``param(name)`` returns an unquantized tensor such as ``obs_norm.mean``.
    """

    def linear(self, name: str, x: Any) -> Any: ...
    def linear2(self, name_a: str, a: Any, name_b: str, b: Any) -> Any: ...  # linear(a) + linear(b)
    def param(self, name: str) -> Any: ...
    def relu(self, x: Any) -> Any: ...
    def sigmoid(self, x: Any) -> Any: ...
    def tanh(self, x: Any) -> Any: ...
    def clip(self, x: Any, lo: float, hi: float) -> Any: ...
    def exp(self, x: Any) -> Any: ...
    def logsumexp(self, x: Any) -> Any: ...  # over the last axis, keeping it


def encode(F: Math, config: ModelConfig, obs: Any) -> Any:
    """Standardize, clip and run the encoder MLP: ``[..., obs_dim] -> [..., lstm_in]``."""
    x = (obs - F.param("obs_norm.mean")) / F.param("obs_norm.std")
    if config.obs_clip > 0:
        x = F.clip(x, -config.obs_clip, config.obs_clip)
    for i in range(len(config.encoder)):
        x = F.relu(F.linear(f"encoder.{i}", x))
    return x


def lstm_cell(F: Math, config: ModelConfig, gates: Any, c: Any) -> tuple[Any, Any]:
    """One LSTM update from the gate pre-activations ``lstm.ih(x) + lstm.hh(h)``; returns ``(h, c)``."""
    n = config.hidden
    i_f = F.sigmoid(gates[..., 0:2 * n])  # input and forget gates are adjacent: one call
    i, f = i_f[..., 0:n], i_f[..., n:2 * n]
    g = F.tanh(gates[..., 2 * n:3 * n])
    o = F.sigmoid(gates[..., 3 * n:4 * n])
    c = f * c + i * g
    h = o * F.tanh(c)
    return h, c


def heads(F: Math, h: Any) -> tuple[Any, Any]:
    """Policy head (logits, or the Gaussian mean) and value, from the LSTM output."""
    return F.linear("policy", h), F.linear("value", h)[..., 0]


def step(F: Math, config: ModelConfig, obs: Any, h: Any, c: Any) -> tuple[Any, Any, Any, Any]:
    """One decision for a batch: ``obs [B, obs_dim], h, c [B, hidden]``.

    Returns ``(head [B, A], value [B], h [B, hidden], c [B, hidden])`` where ``head`` holds the
    action-distribution parameters: logits (discrete) or the mean (continuous; the log std is
    the ``policy.log_std`` parameter).
    """
    x = encode(F, config, obs)
    h, c = lstm_cell(F, config, F.linear2("lstm.ih", x, "lstm.hh", h), c)
    head, value = heads(F, h)
    return head, value, h, c


def sequence(F: Math, config: ModelConfig, obs: Any, h: Any, c: Any, starts: Any,
             stack: Any) -> tuple[Any, Any, Any, Any]:
    """The model over a sequence: ``obs [T, B, obs_dim]``, ``starts [T, B]`` (1.0 where an
    episode begins at t, so the recurrent state is reset to zero before that step).

    ``stack`` stacks a list of ``[B, ...]`` arrays along a new axis 0 (``np.stack`` or
    ``mx.stack``). The encoder and the input gates run on all T steps at once; only the
    recurrence is sequential. Returns ``(heads [T, B, A], values [T, B], h, c)``.
    """
    ih = F.linear("lstm.ih", encode(F, config, obs))
    keep = 1.0 - starts[..., None]
    hs = []
    for t in range(obs.shape[0]):
        h = h * keep[t]
        h, c = lstm_cell(F, config, ih[t] + F.linear("lstm.hh", h), c * keep[t])
        hs.append(h)
    head, value = heads(F, stack(hs))
    return head, value, h, c


# -- action distributions ---------------------------------------------------------------------


def log_prob(F: Math, config: ModelConfig, head: Any, action: Any, onehot: Any = None) -> Any:
    """Log-probability of ``action`` under the head's distribution, over the last axis.

    Discrete: ``onehot`` is the one-hot encoding of ``action`` (the caller builds it with its
    own library; gather differs between numpy and MLX). Continuous: diagonal Gaussian.
    """
    if config.action.discrete:
        logp = head - F.logsumexp(head)
        return (logp * onehot).sum(axis=-1)
    log_std = F.param("policy.log_std")
    z = (action - head) / F.exp(log_std)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(axis=-1)


def entropy(F: Math, config: ModelConfig, head: Any) -> Any:
    """Entropy of the head's distribution, over the last axis."""
    if config.action.discrete:
        logp = head - F.logsumexp(head)
        return -(F.exp(logp) * logp).sum(axis=-1)
    log_std = F.param("policy.log_std")
    # State-independent: the same value for every row; ``0 * head`` gives it the batch shape.
    return (log_std + 0.5 * (1.0 + LOG_2PI)).sum(axis=-1) + 0.0 * head[..., 0]


@dataclass
class NumpyMath:
    """The reference math: plain numpy on fp32 arrays ``{name: array}``.

    Used by the numpy backend (with weights dequantized once at load) and by tests.
    """

    params: Mapping[str, np.ndarray]
    _wt: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Transposed, contiguous weights make ``x @ W.T`` a plain row-major product.
        for name, w in self.params.items():
            if name.endswith(".weight"):
                self._wt[name[: -len(".weight")]] = np.ascontiguousarray(w.T, dtype=np.float32)
        if "lstm.ih" in self._wt and "lstm.hh" in self._wt:
            # One product over the stacked LSTM weights streams them once instead of twice.
            self._wt["lstm.ih+lstm.hh"] = np.concatenate([self._wt["lstm.ih"], self._wt["lstm.hh"]])

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        y = x @ self._wt[name]
        b = self.params.get(name + ".bias")
        if b is not None:
            y += b
        return y

    def linear2(self, name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> np.ndarray:
        w = self._wt.get(name_a + "+" + name_b)
        if w is None:
            return self.linear(name_a, a) + self.linear(name_b, b)
        y = np.concatenate([a, b], axis=-1) @ w
        for name in (name_a, name_b):
            bias = self.params.get(name + ".bias")
            if bias is not None:
                y += bias
        return y

    def param(self, name: str) -> np.ndarray:
        return self.params[name]

    relu = staticmethod(lambda x: np.maximum(x, 0.0, out=x))
    tanh = staticmethod(np.tanh)
    exp = staticmethod(np.exp)

    @staticmethod
    def sigmoid(x: np.ndarray) -> np.ndarray:
        # The tanh form never overflows, unlike 1 / (1 + exp(-x)).
        return 0.5 * np.tanh(0.5 * x) + 0.5

    @staticmethod
    def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip(x, lo, hi, out=x)

    @staticmethod
    def logsumexp(x: np.ndarray) -> np.ndarray:
        m = x.max(axis=-1, keepdims=True)
        return m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
