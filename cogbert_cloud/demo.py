"""``cogbert demo``: the README's main job.

Interim version (until the fleet demo lands): build the reference model, quantize it, and run
a few device sessions' decision loops on every backend, reporting decision latency.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from cogbert_edge import Bundle, ModelConfig, Policy, init_params
from cogbert_edge.backends import available_backends
from cogbert_edge.quant import plan, quantize_params


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo (for now: a short decision-loop demo)")
    p.add_argument("--sessions", type=int, default=4, help="concurrent device sessions")
    p.add_argument("--steps", type=int, default=500, help="decisions per session")
    p.add_argument("--out", type=Path, default=None, help="keep the bundles in this directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    workdir = args.out or Path(tempfile.mkdtemp(prefix="cogbert-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.reference()
    params = init_params(config, seed=0, policy_gain=1.0)
    fp32 = Bundle.create(config, params)
    paths = {"fp32": workdir / "model-fp32.safetensors"}
    fp32.save(paths["fp32"])
    for bits in (8, 4):
        layers = plan(config, bits)
        q = Bundle.create(config, quantize_params(params, layers), quant=layers, parent=fp32.model_id)
        paths[f"int{bits}"] = workdir / f"model-int{bits}.safetensors"
        q.save(paths[f"int{bits}"])

    rows = []
    rng = np.random.default_rng(1)
    for backend in available_backends():
        for quant, path in paths.items():
            policy = Policy.load(path, backend=backend, seed=0)
            states = [policy.initial_state() for _ in range(args.sessions)]
            lat = []
            actions = np.zeros(config.action.size, int)
            # A sensor stream per session: slow sinusoids plus noise, like a real plant.
            phase = rng.uniform(0, 2 * np.pi, (args.sessions, config.obs_dim))
            for t in range(args.steps):
                for s in range(args.sessions):
                    obs = np.sin(0.05 * t + phase[s]) + 0.1 * rng.standard_normal(config.obs_dim)
                    t0 = time.perf_counter_ns()
                    d = policy.act(obs.astype(np.float32), states[s])
                    lat.append(time.perf_counter_ns() - t0)
                    states[s] = d.state
                    actions[d.action] += 1
            lat_us = np.array(lat) / 1e3
            rows.append({"backend": backend, "quant": quant, "bundle_bytes": path.stat().st_size,
                         "decisions": len(lat), "p50_us": round(float(np.percentile(lat_us, 50)), 1),
                         "p99_us": round(float(np.percentile(lat_us, 99)), 1),
                         "action_histogram": actions.tolist()})
    if args.json:
        print(json.dumps({"workdir": str(workdir), "rows": rows}))
        return 0
    print(f"Decision-loop demo: {args.sessions} sessions x {args.steps} decisions, reference model "
          f"({config.macs_per_step()} MACs/step), bundles in {workdir}")
    print(f"{'backend':<8} {'quant':<5} {'bytes':>9} {'p50 µs':>8} {'p99 µs':>8}  actions")
    for r in rows:
        print(f"{r['backend']:<8} {r['quant']:<5} {r['bundle_bytes']:>9} {r['p50_us']:>8} {r['p99_us']:>8}  "
              f"{r['action_histogram']}")
    return 0
