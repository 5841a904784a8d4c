"""``cogbert-bench``: the benchmarks that check Cogbert's speed and memory targets.

Benchmarks compare implementations inside one run and pin every library to one thread, so
that a figure is a ratio measured on the same machine at the same moment.
"""

import os

# Before numpy, MLX, onnxruntime or torch load their thread pools.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")
