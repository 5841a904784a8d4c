"""Helpers shared by Cogbert's own packages (atomic files, structured logs, MLX set-up,
tracing). Private: applications must not import them; ``cogbert_cloud`` and the benchmarks may."""
