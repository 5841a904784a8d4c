"""``cogbert-bench native``: the C step alone (no Python), per quantization and batch size.

Runs ``native/build/bench_step`` (built by ``make -C native``) on the reference model, which it
builds in C with random weights, and reports p50/p99 per call, GMAC/s at the p50, the peak
multiply-add rate of the kernel's instruction measured on this core just before each row
(``peak_gmacs``, native/bench/peak.c) and the fraction of it reached (``fraction_of_peak``).
``--kernel`` forces a kernel (``scalar``, ``avx2``, ``vnni``, ``avx512``, ``vnni512``, ``neon``;
default: what ``auto`` picks). Compare with the
``native`` rows of ``cogbert-bench edge``: the difference is the Python API's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

from cogbert_edge.inference.backends.native_backend import KERNELS

NATIVE = Path(__file__).resolve().parent.parent / "native"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("native", help="decision latency of the C runtime alone (no Python)")
    p.add_argument("--steps", type=int, default=5000, help="timed calls at batch 1 (a tenth at batch 64)")
    p.add_argument("--kernel", choices=sorted(KERNELS), default="auto")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> dict:
    exe = NATIVE / "build" / "bench_step"
    if not exe.is_file():
        subprocess.run(["make", "-s", "-C", str(NATIVE), "build/bench_step"], check=True)
    env = {**os.environ, "COGBERT_KERNEL": str(KERNELS[args.kernel])}
    out = subprocess.run([str(exe), str(args.steps)], check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out)
    names = {v: k for k, v in KERNELS.items()}
    for row in result["results"]:
        row["kernel"] = names.get(row["kernel"], str(row["kernel"]))
    result["machine"] = {"platform": platform.platform(), "machine": platform.machine(), "threads": 1,
                         "load_1min": os.getloadavg()[0]}
    return result


def table(result: dict) -> str:
    lines = [f"{'quant':<5} {'batch':>5} {'kernel':<7} {'p50 µs':>9} {'p99 µs':>9} {'decisions/s':>12} "
             f"{'GMAC/s':>7} {'peak':>7} {'of peak':>7} {'policy bytes':>12}"]
    for r in result["results"]:
        lines.append(f"{r['quant']:<5} {r['batch']:>5} {r['kernel']:<7} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
                     f"{r['decisions_per_s']:>12.0f} {r['gmacs']:>7.1f} {r['peak_gmacs']:>7.1f} "
                     f"{r['fraction_of_peak']:>7.0%} {r['policy_bytes']:>12}")
    return "\n".join(lines)
