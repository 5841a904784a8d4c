"""A connected device application: decides in its own loop, reports delayed rewards, and takes
part in the fleet (its experience is uploaded for training, it reports telemetry, and with a
trust root it installs signed releases, trials them and rolls back by itself).

    cogbert pki init pki && cogbert pki issue-server pki --host localhost
    cogbert pki issue-device pki press-1 && cogbert pki issue-service pki ingest
    cogbert broker config pki --out broker && mosquitto -c broker/mosquitto.conf &
    cogbert cloud ingest --broker mqtts://localhost:8884 --pki pki --store file://./store &
    cogbert bundle init --obs-dim 6 --hidden 32 --encoder 32 --actions 4 model.safetensors
    python examples/connected_device.py --device-id press-1 --pki pki --bundle model.safetensors

The plant here is made up: each of a few presses has a hidden load that drifts; the device reads
noisy sensors, picks one of N pressure settings, and learns how good the choice was only when
the part reaches inspection, ``--reward-delay`` decisions later. That is the common case on real
sites, and the reason the SDK credits a reward to the decision it belongs to (``step=``) rather
than to the latest one.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from cogbert_edge import CogbertError, Device, DeviceSettings, ObservationError


class Press:
    """One controlled unit: a hidden load that drifts; the best setting follows it."""

    def __init__(self, obs_dim: int, n_settings: int, rng: np.random.Generator) -> None:
        self.obs_dim, self.n, self.rng = obs_dim, n_settings, rng
        self.load = float(rng.uniform(0, n_settings - 1))
        self.gain = rng.uniform(0.5, 1.5, obs_dim)

    def sense(self) -> np.ndarray:
        self.load = float(np.clip(self.load + 0.1 * self.rng.standard_normal(), 0, self.n - 1))
        return (self.gain * self.load / self.n + 0.05 * self.rng.standard_normal(self.obs_dim)).astype(np.float32)

    def quality(self, setting: int, load_then: float) -> float:
        return 1.0 - abs(setting - load_then) / self.n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-id", required=True)
    p.add_argument("--fleet", default="default")
    p.add_argument("--broker", default="mqtts://localhost:8883")
    p.add_argument("--pki", type=Path, required=True, help="PKI directory (ca.pem, devices/ID/{cert,key}.pem)")
    p.add_argument("--bundle", type=Path, required=True, help="the factory model")
    p.add_argument("--spool", type=Path, default=None, help="durable state (default spool/DEVICE_ID)")
    p.add_argument("--trust-root", type=Path, default=None, help="root.json: take signed updates")
    p.add_argument("--model-name", default="cogbert")
    p.add_argument("--units", type=int, default=3, help="presses this device controls (one session each)")
    p.add_argument("--steps", type=int, default=1000, help="decisions per unit (0: until SIGTERM)")
    p.add_argument("--rate", type=float, default=200.0, help="decisions per second per unit")
    p.add_argument("--episode", type=int, default=100, help="decisions per batch of parts (an episode)")
    p.add_argument("--reward-delay", type=int, default=2, help="decisions between a choice and its inspection")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    a = p.parse_args(argv)

    settings = DeviceSettings(device_id=a.device_id, fleet=a.fleet, broker=a.broker, pki=a.pki,
                              spool=a.spool or Path("spool") / a.device_id, bundle=a.bundle,
                              trust_root=a.trust_root, model_name=a.model_name,
                              reward_delay=a.reward_delay, telemetry_interval=2.0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        device = Device(settings).start()
    except CogbertError as e:           # a bad bundle, certificate or setting: say so in one line
        print(f"connected_device: {e}", file=sys.stderr)
        return 2

    cfg = device.policy.config
    if not cfg.action.discrete:
        print("connected_device: this example drives discrete settings; give a discrete bundle", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    presses = {f"press-{u}": Press(cfg.obs_dim, cfg.action.size, rng) for u in range(a.units)}
    # Parts on their way to inspection: (unit, step of the decision, setting, load at the time).
    inspection: deque[tuple[str, int, int, float]] = deque()
    decisions, rewarded, reward_sum = 0, 0, 0.0
    period, t_next = 1.0 / a.rate, time.monotonic()
    t = 0
    with device:
        while not stop.is_set() and (a.steps == 0 or t < a.steps):
            last_of_episode = (t + 1) % a.episode == 0
            for unit, press in presses.items():
                try:
                    d = device.act(unit, press.sense())   # the device keeps each unit's LSTM state
                except ObservationError as e:             # a broken sensor: skip, keep going
                    print(f"{unit}: {e}", file=sys.stderr)
                    continue
                decisions += 1
                inspection.append((unit, d.step, int(d.action), press.load))
            # Parts decided reward_delay rounds ago reach inspection now.
            while len(inspection) > a.reward_delay * len(presses):
                unit, step, setting, load = inspection.popleft()
                r = presses[unit].quality(setting, load)
                device.reward(unit, r, step=step)
                rewarded += 1
                reward_sum += r
            if last_of_episode:   # the batch is done: inspect what is left, end the episode
                while inspection:
                    unit, step, setting, load = inspection.popleft()
                    r = presses[unit].quality(setting, load)
                    device.reward(unit, r, step=step)
                    rewarded += 1
                    reward_sum += r
                for unit in presses:
                    device.reward(unit, 0.0, truncated=True)
            t += 1
            t_next += period
            stop.wait(max(0.0, t_next - time.monotonic()))
        device.flush()
        deadline = time.monotonic() + a.drain_timeout
        while not device.drained() and time.monotonic() < deadline:
            time.sleep(0.05)
        telemetry = device.telemetry()
        summary = {"device": a.device_id, "decisions": decisions, "rewards": rewarded,
                   "reward_sum": round(reward_sum, 6), "logged": telemetry.outbox.last_seq,
                   "drained": device.drained(), "model": telemetry.model,
                   "late_rewards": telemetry.late_rewards, "backend": device.policy.backend}
    print(json.dumps(summary))
    return 0 if summary["drained"] else 1


if __name__ == "__main__":
    sys.exit(main())
