"""Import MLX, on Linux with an optimised BLAS underneath it.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (about 4.5 GFLOP/s for an fp32 matmul on
our 2-core x86 machine). Loading OpenBLAS into the global symbol scope *before* MLX is
imported makes MLX's ``cblas_*`` calls resolve to OpenBLAS (about 60-90 GFLOP/s), with no
``LD_PRELOAD`` and no change to the wheel. This only works if nothing imported MLX first;
``COGBERT_OPENBLAS`` names the library explicitly, ``COGBERT_OPENBLAS=off`` disables it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("cogbert.mlx")

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_state: dict[str, Any] = {}


def openblas_path() -> str | None:
    """The OpenBLAS library this process would preload for MLX, or None."""
    env = os.environ.get("COGBERT_OPENBLAS", "")
    if env.lower() in ("off", "0", "no", "false"):
        return None
    if env:
        return env
    for c in _CANDIDATES:
        if Path(c).exists():
            return c
    return ctypes.util.find_library("openblas")


def blas_status() -> str:
    """``openblas:<path>``, ``reference`` (Linux without OpenBLAS) or ``native`` (macOS)."""
    import_mlx()
    return _state.get("blas", "unavailable")


def import_mlx() -> Any:
    """Return ``mlx.core``, or None when MLX is not installed."""
    if "mx" in _state:
        return _state["mx"]
    already = "mlx.core" in sys.modules
    blas = "native" if sys.platform == "darwin" else "reference"
    if sys.platform.startswith("linux"):
        path = openblas_path()
        if path and not already:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                blas = f"openblas:{path}"
            except OSError as e:
                log.warning('{"event": "openblas_load_failed", "path": "%s", "error": "%s"}', path, e)
        elif path and already:
            log.warning('{"event": "mlx_imported_before_cogbert", "hint": "import cogbert_edge before '
                        'mlx, or set LD_PRELOAD=%s, for a fast BLAS"}', path)
    mx: Any
    try:
        import mlx.core as mx
    except ImportError:
        mx = None
        blas = "unavailable"
    _state["mx"] = mx
    _state["blas"] = blas
    return mx
