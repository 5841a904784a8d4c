"""Backends agree with the numpy reference, and ``auto`` follows its documented rule."""

from __future__ import annotations

import numpy as np
import pytest

from cogbert_edge import BackendUnavailableError, ConfigError
from cogbert_edge.inference.backends import (
    AUTO_ORDER,
    available_backends,
    create_backend,
    resolve_backend,
)

from .helpers import needs_mlx

# fp32 products summed in another order differ by ~1e-7 here; 1e-5 over a 300-step recurrent
# rollout leaves room for other BLAS kernels while catching any wrong operation.
TOL = 1e-5


@needs_mlx
@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 64])
def test_mlx_agrees_with_numpy_along_a_recurrent_rollout(bundles, quant, batch):
    ref, mlx = create_backend(bundles[quant], "numpy"), create_backend(bundles[quant], "mlx")
    rng = np.random.default_rng(0)
    hidden = bundles[quant].config.hidden
    h1 = c1 = h2 = c2 = np.zeros((batch, hidden), np.float32)
    # MLX's CPU quantized matmul takes ~35 ms at batch 64: a shorter rollout there.
    for _ in range(300 if batch == 1 else 40):
        obs = (2 * rng.standard_normal((batch, 64))).astype(np.float32)
        a1, v1, h1, c1 = ref.step(obs, h1, c1)
        a2, v2, h2, c2 = mlx.step(obs, h2, c2)
        for x, y in ((a1, a2), (v1, v2), (h1, h2), (c1, c2)):
            assert np.abs(x - y).max() <= TOL


def test_auto_picks_the_first_available_backend_of_the_documented_order(monkeypatch):
    # The documented rule, written out rather than recomputed from AUTO_ORDER: native where it
    # has SIMD kernels for this CPU, else numpy (always available, ahead of MLX).
    from cogbert_edge.inference.backends.native_backend import native_simd
    monkeypatch.delenv("COGBERT_BACKEND", raising=False)
    expected = "native" if native_simd() else "numpy"
    assert resolve_backend("auto") == expected == resolve_backend(None)
    assert AUTO_ORDER == (("native", "numpy", "mlx") if native_simd() else ("numpy", "mlx", "native"))
    monkeypatch.setenv("COGBERT_BACKEND", "numpy")
    assert resolve_backend(None) == "numpy"
    assert resolve_backend("auto") == expected          # an explicit "auto" ignores the variable


def test_unknown_or_unavailable_backends_are_typed_errors(monkeypatch, bundles):
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("tpu")
    from cogbert_edge.inference import backends
    monkeypatch.setitem(backends.BACKENDS, "mlx", (backends.BACKENDS["mlx"][0], lambda: False))
    with pytest.raises(BackendUnavailableError, match="not available"):
        create_backend(bundles["fp32"], "mlx")


def test_backends_do_not_modify_their_inputs(bundles):
    for name in available_backends():
        be = create_backend(bundles["int8"], name)
        obs = np.ones((2, 64), np.float32)
        h = np.full((2, 256), 0.5, np.float32)
        c = h.copy()
        be.step(obs, h, c)
        assert (obs == 1).all() and (h == 0.5).all() and (c == 0.5).all(), name
