"""The MLX backend's two quantized paths: ``kernel`` (``mx.quantized_matmul`` on the packed
tensors) and ``dequantize`` (weights dequantized once at load, fp32 matmuls), which ``auto``
takes on MLX's CPU device because its ``quantized_matmul`` there is a plain loop (measured
9-50x slower than fp32, docs/performance.md). Both must compute the bundle's dequantized math."""

from __future__ import annotations

import numpy as np
import pytest

from cogbert_edge import Bundle, ConfigError, ModelConfig, init_params
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.inference.backends.numpy_backend import NumpyBackend
from cogbert_edge.inference.quant import plan, quantize_params

mx = import_mlx()
pytestmark = pytest.mark.skipif(mx is None, reason="MLX is not installed (pip install 'cogbert[mlx]')")


@pytest.fixture(scope="module", params=[8, 4])
def bundle(request) -> Bundle:
    config = ModelConfig.reference()
    params = init_params(config, 2, policy_gain=1.0)
    layers = plan(config, request.param)
    return Bundle.create(config, quantize_params(params, layers), quant=layers)


def test_auto_dequantizes_on_the_cpu_and_keeps_the_kernel_on_a_gpu(monkeypatch):
    from cogbert_edge.inference.backends.mlx_backend import quant_path
    monkeypatch.delenv("COGBERT_MLX_QUANT", raising=False)
    assert quant_path(mx) == ("kernel" if mx.default_device() == mx.gpu else "dequantize")
    monkeypatch.setenv("COGBERT_MLX_QUANT", "kernel")
    assert quant_path(mx) == "kernel"
    assert quant_path(mx, "dequantize") == "dequantize"
    monkeypatch.setenv("COGBERT_MLX_QUANT", "fast")
    with pytest.raises(ConfigError, match="kernel"):
        quant_path(mx)


@pytest.mark.parametrize("path", ["kernel", "dequantize"])
@pytest.mark.parametrize("batch", [1, 16])
def test_both_paths_compute_the_dequantized_model(bundle, path, batch):
    from cogbert_edge.inference.backends.mlx_backend import MLXBackend
    be = MLXBackend(bundle, quant=path)
    assert be.quant_path == path
    ref = NumpyBackend(bundle)
    rng = np.random.default_rng(4)
    h1 = c1 = h2 = c2 = np.zeros((batch, 256), np.float32)
    for _ in range(20):
        obs = (2 * rng.standard_normal((batch, 64))).astype(np.float32)
        a1, v1, h1, c1 = ref.step(obs, h1, c1)
        a2, v2, h2, c2 = be.step(obs, h2, c2)
        for p, q in ((a1, a2), (v1, v2), (h1, h2), (c1, c2)):
            assert np.abs(p - q).max() <= 1e-4 * max(1.0, float(np.abs(p).max()))
