"""``cogbert-bench edge``: single-decision latency through the public Policy API, per backend,
quantization and batch size, next to ONNX Runtime and PyTorch running the same step.

Native rows also time the same calls with the binding's null step (``set_null_step``: the C
step skipped, everything else done), so ``binding_p50_us`` is the Python call path's own cost
and ``binding_share`` its fraction of the call (binding / (call - binding) is the overhead
against the C time). ``machine.load_1min`` is the load average when the run started."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from cogbert_bench._timing import summary_us, time_calls
from cogbert_bench.peers import PEERS, peer_available
from cogbert_edge import Bundle, ModelConfig, Policy, init_params
from cogbert_edge._internal.mlx import blas_status
from cogbert_edge.inference.backends import BACKENDS, available_backends
from cogbert_edge.inference.model import NumpyMath, step
from cogbert_edge.inference.quant import plan, quantize_params

QUANTS = ("fp32", "int8", "int4")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edge", help="decision latency of the edge SDK and its peers")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from {sorted(BACKENDS) + sorted(PEERS)} (default: all available)")
    p.add_argument("--quant", default=",".join(QUANTS))
    p.add_argument("--batch", default="1,64")
    p.add_argument("--steps", type=int, default=2000, help="timed calls per row (after warm-up)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def bundles(workdir: Path, seed: int) -> tuple[ModelConfig, dict, dict[str, Path]]:
    config = ModelConfig.reference()
    # A policy head at full scale, so that actions depend on the weights as a trained model's do.
    params = init_params(config, seed, policy_gain=1.0)
    base = Bundle.create(config, params)
    paths = {"fp32": workdir / "fp32.safetensors"}
    base.save(paths["fp32"])
    for bits in (8, 4):
        layers = plan(config, bits)
        paths[f"int{bits}"] = workdir / f"int{bits}.safetensors"
        Bundle.create(config, quantize_params(params, layers), quant=layers,
                      parent=base.model_id).save(paths[f"int{bits}"])
    return config, params, paths


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(backends: list[str], quants: list[str], batches: list[int], steps: int, warmup: int,
        seed: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config, params, paths = bundles(Path(tmp), seed)
        rng = np.random.default_rng(seed)
        for batch in batches:
            pool = rng.standard_normal((64, batch, config.obs_dim)).astype(np.float32)
            for quant in quants:
                for name in backends:
                    if name in PEERS:
                        if quant != "fp32":
                            continue
                        rows.append(_peer_row(name, params, config, batch, pool, steps, warmup))
                    else:
                        rows.append(_policy_row(name, quant, paths[quant], batch, pool, steps, warmup, seed))
    return {
        "suite": "edge",
        "model": {**config.to_dict(), "obs_clip": config.obs_clip, "macs_per_step": config.macs_per_step()},
        "machine": {"platform": platform.platform(), "machine": platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "mlx_blas": blas_status(), "threads": 1, "load_1min": os.getloadavg()[0],
                    "cpu": _cpu_name()},
        "steps": steps,
        "results": rows,
    }


def _policy_row(backend: str, quant: str, path: Path, batch: int, pool: np.ndarray, steps: int,
                warmup: int, seed: int) -> dict:
    policy = Policy.load(path, backend=backend, seed=seed)
    holder = [policy.initial_state(None if batch == 1 else batch)]
    n = len(pool)
    if batch == 1:
        singles = pool[:, 0, :]

        def call(i: int) -> None:
            holder[0] = policy.act(singles[i % n], holder[0]).state
    else:
        def call(i: int) -> None:
            holder[0] = policy.act_batch(pool[i % n], holder[0]).state
    t = time_calls(call, steps, warmup)
    row = {"backend": backend, "quant": quant, "batch": batch, "api": "Policy.act" if batch == 1
           else "Policy.act_batch", **summary_us(t), "decisions_per_s": round(batch * steps / t.sum(), 1),
           "bundle_bytes": path.stat().st_size}
    null = getattr(policy._backend, "set_null_step", None)
    if null is not None:
        null(True)
        try:
            b = summary_us(time_calls(call, steps, warmup))
        finally:
            null(False)
        row["binding_p50_us"] = b["p50_us"]
        row["binding_p99_us"] = b["p99_us"]
        row["c_p50_us"] = round(row["p50_us"] - b["p50_us"], 2)
        row["binding_vs_c"] = round(b["p50_us"] / max(row["c_p50_us"], 1e-9), 3)
    return row


def _peer_row(name: str, params: dict, config: ModelConfig, batch: int, pool: np.ndarray,
              steps: int, warmup: int) -> dict:
    # Check the peer computes our model before timing it: same weights must give the same head.
    ref_head = step(NumpyMath(params), config, pool[0], *(np.zeros((batch, config.hidden), np.float32),) * 2)[0]
    peer = PEERS[name](params, config, batch)
    diff = float(np.abs(peer.step(pool[0]) - ref_head).max())
    if diff > 1e-3:
        raise RuntimeError(f"peer {name} disagrees with the numpy reference (max |diff| {diff})")
    peer = PEERS[name](params, config, batch)
    n = len(pool)
    t = time_calls(lambda i: peer.step(pool[i % n]), steps, warmup)
    model_bytes = sum(int(np.asarray(v).nbytes) for v in params.values())
    return {"backend": name, "quant": "fp32", "batch": batch, "api": "raw step (peer)", **summary_us(t),
            "decisions_per_s": round(batch * steps / t.sum(), 1), "bundle_bytes": model_bytes,
            "max_abs_diff_vs_numpy": diff}


def main(args: argparse.Namespace) -> dict:
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    else:
        backends = available_backends() + [p for p in PEERS if peer_available(p)]
    for b in backends:
        if b not in BACKENDS and b not in PEERS:
            raise SystemExit(f"cogbert-bench: unknown backend {b!r}")
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    for q in quants:
        if q not in QUANTS:
            raise SystemExit(f"cogbert-bench: unknown quantization {q!r}; choose from {QUANTS}")
    batches = [int(b) for b in args.batch.split(",")]
    return run(backends, quants, batches, args.steps, args.warmup, args.seed)


def table(result: dict) -> str:
    lines = [f"{'backend':<12} {'quant':<5} {'batch':>5} {'p50 µs':>9} {'p95 µs':>9} {'p99 µs':>9} "
             f"{'decisions/s':>12} {'bytes':>9} {'binding µs':>10}"]
    for r in result["results"]:
        binding = f"{r['binding_p50_us']:>10.2f}" if "binding_p50_us" in r else f"{'':>10}"
        lines.append(f"{r['backend']:<12} {r['quant']:<5} {r['batch']:>5} {r['p50_us']:>9.1f} "
                     f"{r['p95_us']:>9.1f} {r['p99_us']:>9.1f} {r['decisions_per_s']:>12.0f} {r['bundle_bytes']:>9}"
                     f" {binding}")
    return "\n".join(lines)
