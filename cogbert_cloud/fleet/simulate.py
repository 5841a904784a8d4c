"""Simulated devices: ``cogbert device simulate``.

Runs N devices in one process, each a real :class:`cogbert_edge.Device` (Policy API, outbox,
uploader, its own mutual-TLS MQTT link) acting in its own simulator instance. Tests,
benchmarks and the demo use it; a Kubernetes Deployment of it feeds training from simulation.

``--steps S`` means: run until the device has logged S decisions in its outbox, counting
those logged before a restart (the outbox remembers), then wait until the cloud has
acknowledged all of them. So a killed and restarted simulation ends with exactly S records
per device stored in the cloud. ``--keep-running T`` goes on deciding for T more seconds
(to take part in rollouts); SIGTERM ends the deciding early, and the devices still deliver
everything they logged before the process prints its summary and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogbert_edge import Device, DeviceSettings, UpdateSettings
from cogbert_edge._internal.log import event
from cogbert_edge.config import add_arguments, from_args
from cogbert_edge.errors import ConfigError
from cogbert_edge.experience.uploader import UploaderSettings
from cogbert_edge.inference.bundle import load_bundle

__all__ = ["SimulateSettings", "SensorEnv", "run"]

log = logging.getLogger("cogbert.simulate")


@dataclass
class SimulateSettings:
    devices: int = 4
    steps: int = 1000
    broker: str = "mqtts://localhost:8883"
    pki: Path = Path("pki")
    spool: Path = Path("spool")
    bundle: Path = Path("model.safetensors")
    seed: int = 0
    fleet: str = "sim"
    prefix: str = field(default="sim", metadata={"help": "device ids are PREFIX-0000, PREFIX-0001, ..."})
    first_index: int = 0
    env: str = field(default="auto", metadata={"help": "sensor, auto (by the bundle's shape: ProductionChain-v0 "
                                               "or sensor), or any Gymnasium id the bundle fits"})
    env_package: str = field(default="", metadata={"help": "modules to import first (they register --env)"})
    rate: float = field(default=0.0, metadata={"help": "decisions per second per device; 0 = as fast as possible"})
    drain_timeout: float = 120.0
    ack_timeout: float = 10.0
    provision: bool = field(default=False, metadata={"help": "issue missing device identities from the PKI's CA"})
    backend: str = "auto"
    telemetry_interval: float = 10.0
    trust_root: Path | None = field(default=None, metadata={"help": "root.json: accept signed updates"})
    model_name: str = "cogbert"
    trial_decisions: int = 200
    trial_seconds: float = 5.0
    keep_running: float = field(default=0.0, metadata={"help": "seconds to keep deciding after the steps"
                                                                 " (at --rate), e.g. to take part in a rollout"})


class SensorEnv:
    """A small built-in environment for any observation size: the right action is a slowly
    drifting hidden target that the observation encodes through noisy sinusoids."""

    def __init__(self, obs_dim: int, n_actions: int, seed: int, episode: int = 200) -> None:
        self.obs_dim, self.n, self.episode = obs_dim, n_actions, episode
        self.rng = np.random.default_rng(seed)
        self.freq = self.rng.uniform(0.5, 2.0, obs_dim)

    def reset(self) -> np.ndarray:
        self.t = 0
        self.target = int(self.rng.integers(self.n))
        return self._obs()

    def _obs(self) -> np.ndarray:
        return (np.sin(self.freq * (self.target + 1)) + 0.3 * self.rng.standard_normal(self.obs_dim)).astype(np.float32)

    def step(self, action) -> tuple[np.ndarray, float, bool, bool]:
        reward = 1.0 if int(action) == self.target else 0.0
        self.t += 1
        if self.rng.random() < 0.05:
            self.target = int(self.rng.integers(self.n))
        return self._obs(), reward, False, self.t >= self.episode


def _make_env(name: str, obs_dim: int, n_actions: int, seed: int, *, discrete: bool = True,
              env_package: str = ""):
    """The environment a simulated device acts in: ``sensor``, ``auto`` (ProductionChain-v0 when
    the bundle fits it and gymnasium is installed, else ``sensor``), or any Gymnasium id the
    bundle fits (``env_package``: modules to import first, comma-separated), with discrete or
    continuous actions."""
    if name == "sensor" or (name == "auto" and discrete):
        if name == "sensor" and not discrete:
            raise ConfigError("the sensor environment takes discrete actions; name the bundle's environment (--env ID)")
        try:
            from cogbert_cloud.learn.envs import make_env
        except ModuleNotFoundError:
            return SensorEnv(obs_dim, n_actions, seed)
        if name == "sensor":
            return SensorEnv(obs_dim, n_actions, seed)
        env = make_env("ProductionChain-v0")
        fits = env.observation_space.shape == (obs_dim,) and getattr(env.action_space, "n", None) == n_actions
        return _GymAdapter(env, seed, discrete=True) if fits else SensorEnv(obs_dim, n_actions, seed)
    if name == "auto":
        raise ConfigError("a bundle with continuous actions needs its environment named: --env ID (e.g. Pendulum-v1)")
    from cogbert_cloud.learn.envs import import_env_packages, make_env
    from cogbert_cloud.learn.envs.gym_adapter import action_bounds, flat_obs_dim
    import_env_packages(env_package)
    env = make_env(name)
    kind, size, _, _ = action_bounds(env.action_space, name)
    dim = flat_obs_dim(env.observation_space, name)
    if dim != obs_dim or size != n_actions or (kind == "discrete") != discrete:
        raise ConfigError(f"the bundle (obs {obs_dim}, {n_actions} {'discrete' if discrete else 'continuous'} "
                          f"actions) does not fit {name} (obs {dim}, {size} {kind}); train one for it "
                          f"(cogbert cloud train --env {name})")
    return _GymAdapter(env, seed, discrete=discrete)


class _GymAdapter:
    def __init__(self, env, seed: int, *, discrete: bool = True) -> None:
        self.env, self.seed, self.discrete = env, seed, discrete
        self._start = int(getattr(env.action_space, "start", 0)) if discrete else 0

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.seed)
        self.seed += 1_000_003
        return np.asarray(obs, np.float32).reshape(-1)

    def step(self, action):
        # Continuous: the Policy already applied the bundle's bounds (the action it logged).
        a = int(action) + self._start if self.discrete else np.asarray(action, self.env.action_space.dtype)
        obs, r, term, trunc, _ = self.env.step(a)
        return np.asarray(obs, np.float32).reshape(-1), float(r), bool(term), bool(trunc)


_stop = threading.Event()   # SIGTERM: stop deciding, deliver what was logged, report


def _device_main(s: SimulateSettings, index: int, results: dict) -> None:
    dev_id = f"{s.prefix}-{index:04d}"
    try:
        _simulate_device(s, index, dev_id, results)
    except Exception as e:  # noqa: BLE001 - the summary says why this device did not run
        event(log, "device_failed", level=logging.ERROR, device=dev_id, error=str(e)[:300])
        results[dev_id] = {"error": f"{type(e).__name__}: {e}", "logged": 0, "drained": False}


def _simulate_device(s: SimulateSettings, index: int, dev_id: str, results: dict) -> None:
    dev = Device(DeviceSettings(device_id=dev_id, fleet=s.fleet, broker=s.broker, pki=s.pki,
                                spool=s.spool / dev_id, bundle=s.bundle, backend=s.backend, seed=s.seed + index,
                                uploader=UploaderSettings(ack_timeout=s.ack_timeout), trust_root=s.trust_root,
                                model_name=s.model_name,
                                update=UpdateSettings(trial_decisions=s.trial_decisions, trial_seconds=s.trial_seconds),
                                telemetry_interval=s.telemetry_interval)).start()
    cfg = dev.policy.config
    env = _make_env(s.env, cfg.obs_dim, cfg.action.size, s.seed * 7919 + index, discrete=cfg.action.discrete,
                    env_package=s.env_package)
    logged_before = dev.outbox.last_seq
    todo = max(0, s.steps - logged_before)
    obs, state = env.reset(), dev.policy.initial_state()
    period = 1.0 / s.rate if s.rate > 0 else 0.0
    next_t = time.monotonic()
    episode_return, returns = 0.0, []
    done, keep_until = 0, None
    while not _stop.is_set():
        if done >= todo:
            if s.keep_running <= 0:
                break
            keep_until = keep_until or time.monotonic() + s.keep_running
            if time.monotonic() >= keep_until:
                break
        done += 1
        d = dev.act("unit-0", obs, state)
        obs, r, term, trunc = env.step(d.action)
        episode_return += r
        dev.reward("unit-0", r, done=term, truncated=trunc)
        if term or trunc:
            returns.append(episode_return)
            episode_return = 0.0
            obs, state = env.reset(), dev.policy.initial_state()
        else:
            state = d.state
        if period:
            next_t += period
            _stop.wait(max(0.0, next_t - time.monotonic()))
    dev.log.flush()
    deadline = time.monotonic() + s.drain_timeout
    while not dev.drained() and time.monotonic() < deadline:
        time.sleep(0.05)
    results[dev_id] = {"logged": dev.outbox.last_seq, "this_run": done, "drained": dev.drained(),
                       "model": dev.policy.model_id,
                       "acked_seq": dev.outbox.acked_seq, "batches_sent": dev.uploader.sent,
                       "batches_resent": dev.uploader.resent, "duplicate_acks": dev.uploader.duplicates,
                       "mean_return": float(np.mean(returns)) if returns else None,
                       **{k: v for k, v in dev.outbox.stats().items() if k.startswith("dropped")}}
    dev.close()


def run(s: SimulateSettings) -> dict:
    if s.provision:
        from cogbert_cloud.fleet.pki import PKI
        pki = PKI.open(s.pki)
        for i in range(s.first_index, s.first_index + s.devices):
            dev_id = f"{s.prefix}-{i:04d}"
            if not (s.pki / "devices" / dev_id / "cert.pem").exists():
                pki.issue_device(dev_id, fleet=s.fleet)
    cfg = load_bundle(s.bundle).config   # fail early and clearly on a bad bundle ...
    # ... or one that does not fit the environment
    _make_env(s.env, cfg.obs_dim, cfg.action.size, s.seed, discrete=cfg.action.discrete, env_package=s.env_package)
    _stop.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: _stop.set())
    results: dict = {}
    threads = [threading.Thread(target=_device_main, args=(s, i, results), name=f"sim-{i}", daemon=True)
               for i in range(s.first_index, s.first_index + s.devices)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = {d: r["error"] for d, r in results.items() if "error" in r}
    summary = {"devices": len(results) - len(errors), "logged": sum(r["logged"] for r in results.values()),
               "errors": errors,
               "all_drained": all(r["drained"] for r in results.values()) and len(results) == s.devices,
               "seconds": round(time.monotonic() - t0, 2), "per_device": results}
    event(log, "simulation_done", devices=summary["devices"], logged=summary["logged"],
          all_drained=summary["all_drained"])
    return summary


def register(device_sub: argparse._SubParsersAction) -> None:
    p = device_sub.add_parser("simulate", help="run N simulated devices that decide and upload experience")
    add_arguments(p, SimulateSettings, env_prefix="SIM_")

    def main(a: argparse.Namespace) -> int:
        settings = from_args(SimulateSettings, a, env_prefix="SIM_")
        summary = run(settings)
        json.dump(summary, sys.stdout)
        print()
        if summary["errors"]:
            device, error = next(iter(summary["errors"].items()))
            print(f"cogbert: error: {len(summary['errors'])} device(s) failed; {device}: {error}", file=sys.stderr)
        elif not summary["all_drained"]:
            print("cogbert: error: not every logged record was acknowledged by the cloud within "
                  f"--drain-timeout {settings.drain_timeout:g}s (is ingestion running?)",
                  file=sys.stderr)
        return 0 if summary["all_drained"] else 1

    p.set_defaults(func=main)
