"""A device application's decision loop with the Cogbert Policy API.

    cogbert bundle init model.safetensors
    python examples/decision_loop.py model.safetensors

Each controlled unit is a session with its own recurrent state, owned by the application.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from cogbert_edge import ObservationError, Policy


def main(path: str, units: int = 3, steps: int = 200) -> None:
    policy = Policy.load(path)  # verifies the bundle; picks the fastest backend here
    states = {u: policy.initial_state() for u in range(units)}
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in range(steps):
        for unit, state in states.items():
            obs = np.sin(0.1 * t + unit + np.arange(policy.config.obs_dim)) + 0.05 * rng.standard_normal(
                policy.config.obs_dim)
            t0 = time.perf_counter()
            try:
                d = policy.act(obs.astype(np.float32), state)
            except ObservationError as e:   # a broken sensor: skip this decision, keep the state
                print(f"unit {unit}: {e}", file=sys.stderr)
                continue
            worst = max(worst, time.perf_counter() - t0)
            states[unit] = d.state
            # apply d.action to the unit here; keep d.log_prob and d.value for the experience log
    print(f"{units * steps} decisions on backend {policy.backend}; slowest {worst * 1e6:.0f} µs")


if __name__ == "__main__":
    main(sys.argv[1])
