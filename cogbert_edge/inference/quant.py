"""Group-wise affine quantization in MLX's layout.

A weight ``W [out, in]`` is cut into groups of ``group_size`` consecutive elements along
``in``. Each group ``g`` of row ``r`` has a float ``scale[r, g]`` and ``bias[r, g]`` and each
element an unsigned ``bits``-bit code ``q``; the weight it stands for is

    w = scale * q + bias

Codes are packed little-end first into uint32 words: element ``j`` of a row lives in word
``j // (32 // bits)`` at bit ``bits * (j % (32 // bits))``. This is exactly what
``mlx.core.quantize`` produces and ``mx.quantized_matmul`` consumes, so a bundle's tensors
go to MLX as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.model import ModelConfig

__all__ = ["QuantSpec", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "pack", "unpack",
           "quantize", "dequantize", "plan", "quantize_params"]

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {self.group_size!r}")

    def packed_cols(self, in_dim: int) -> int:
        return in_dim * self.bits // 32

    def groups(self, in_dim: int) -> int:
        return in_dim // self.group_size

    def to_dict(self) -> dict[str, int]:
        return {"bits": self.bits, "group_size": self.group_size}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``q [out, in]`` (values < 2**bits) into uint32 ``[out, in * bits / 32]``."""
    per = 32 // bits
    out, n = q.shape
    q = q.astype(np.uint32).reshape(out, n // per, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint32 ``[out, words]`` -> uint8 codes ``[out, words * 32 / bits]``."""
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    mask = np.uint32((1 << bits) - 1)
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(packed.shape[0], -1).astype(np.uint8)


def quantize(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max affine quantization of ``w [out, in]``; returns ``(packed, scales, biases)``.

    Every element is reconstructed within half a step of its group: ``|w - deq| <= scale / 2``
    (plus float rounding). A constant group gets scale 0 and is reconstructed exactly.
    """
    out, n = w.shape
    if n % spec.group_size:
        raise ConfigError(f"input dim {n} is not a multiple of group size {spec.group_size}")
    g = w.astype(np.float32).reshape(out, n // spec.group_size, spec.group_size)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    levels = (1 << spec.bits) - 1
    scales = ((hi - lo) / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint((g - lo[..., None]) / safe[..., None]), 0, levels).astype(np.uint8)
    return pack(q.reshape(out, n), spec.bits), scales, lo.astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """``scale * q + bias`` per group, as float32 ``[out, in]``."""
    q = unpack(packed, spec.bits).astype(np.float32)
    out, n = q.shape
    q = q.reshape(out, n // spec.group_size, spec.group_size)
    w = q * scales[..., None] + biases[..., None]
    return w.reshape(out, n).astype(np.float32)


# Layers that are quantized by default. The heads stay fp32: they hold under 0.5 % of the
# reference model's weights, and their error goes straight into the action probabilities.
DEFAULT_QUANTIZED_PREFIXES = ("encoder.", "lstm.")


def plan(config: ModelConfig, bits: int, group_size: int = 64) -> dict[str, QuantSpec]:
    """Which layers get quantized, and with what group size.

    Encoder and LSTM layers are quantized. A layer whose input width is not a multiple of
    ``group_size`` uses the largest supported group size that divides it, and stays fp32
    when none does.
    """
    QuantSpec(bits, group_size)  # validates
    result: dict[str, QuantSpec] = {}
    for layer in config.layers():
        if not layer.name.startswith(DEFAULT_QUANTIZED_PREFIXES):
            continue
        for gs in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
            if gs <= group_size and layer.in_dim % gs == 0:
                result[layer.name] = QuantSpec(bits, gs)
                break
    return result


def quantize_params(params: dict[str, np.ndarray], layers: dict[str, QuantSpec]) -> dict[str, np.ndarray]:
    """Replace ``X.weight`` of every planned layer by ``X.weight`` (packed), ``X.scales``, ``X.biases``."""
    out = dict(params)
    for name, spec in layers.items():
        packed, scales, biases = quantize(params[f"{name}.weight"], spec)
        out[f"{name}.weight"] = packed
        out[f"{name}.scales"] = scales
        out[f"{name}.biases"] = biases
    return out
