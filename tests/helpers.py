"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

HAS_MLX = importlib.util.find_spec("mlx") is not None
# MLX is part of the dev setup on every platform it has wheels for; where it has none, the
# MLX tests cannot run and say so.
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="MLX has no wheel for this platform")



def structured_obs(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    """Sensor-like observations: sinusoids of many frequencies, a slow AR(1) wander, noise."""
    t = np.arange(steps)[:, None]
    phase = rng.uniform(0, 2 * np.pi, dim)
    freq = rng.uniform(0.005, 0.2, dim)
    wander = np.zeros((steps, dim))
    for i in range(1, steps):
        wander[i] = 0.98 * wander[i - 1] + 0.1 * rng.standard_normal(dim)
    return (np.sin(freq * t + phase) + wander + 0.1 * rng.standard_normal((steps, dim))).astype(np.float32)


def mutate_bundle(seed: bytes, data, kinds: list[str], max_rounds: int) -> bytes:
    """Up to ``max_rounds`` hypothesis-drawn mutations of a bundle file: bytes of the header
    replaced ("flip-header"), any bit flipped, truncated, bytes inserted, the header length
    replaced ("length"), header bytes replaced by JSON syntax ("json")."""
    from hypothesis import strategies as st
    buf = bytearray(seed)
    n = struct.unpack_from("<Q", buf)[0]
    for _ in range(data.draw(st.integers(1, max_rounds))):
        kind = data.draw(st.sampled_from(kinds))
        if kind == "flip-header" and 8 < min(8 + n, len(buf)):
            i = data.draw(st.integers(8, min(8 + n, len(buf)) - 1))
            buf[i] = data.draw(st.integers(0, 255))
        elif kind == "flip-any" and buf:
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[data.draw(st.integers(0, len(buf))):]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(buf)))
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "length" and len(buf) >= 8:
            struct.pack_into("<Q", buf, 0, data.draw(st.integers(0, 2 ** 64 - 1)))
        elif kind == "json" and 8 < min(8 + n, len(buf)):
            i = data.draw(st.integers(8, min(8 + n, len(buf)) - 1))
            buf[i] = ord(data.draw(st.sampled_from('{}[]":,\\u0123456789-.eE \tntrfal')))
    return bytes(buf)



# A skip for what this machine is (its CPU, its operating system), not for a tool that
# `./run test` would have installed: COGBERT_STRICT_SKIPS lets these through (conftest.py).
MACHINE_LIMIT = "this machine cannot: "


def skip_on_this_machine(why: str) -> None:
    pytest.skip(MACHINE_LIMIT + why)


def spawn_logged(args: list[str], log: Path, **kw) -> subprocess.Popen:
    """Start a long-lived process with its stderr in ``log``. A pipe that nobody reads fills at
    64 KiB, and then the child blocks in its logging call, and with it whatever thread logged:
    a chatty service (ingestion under attack logs a warning per hostile batch) freezes."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(args, stderr=f, **kw)


def log_tail(log: Path, n: int = 3000) -> str:
    return log.read_bytes()[-n:].decode(errors="replace") if log.exists() else ""
