"""A Cogbert device: the policy, its experience log and outbox, the uploader, the MQTT link
and telemetry, wired together.

    device = Device(DeviceSettings(device_id="dev-1", broker="mqtts://broker:8883",
                                   pki=Path("pki"), spool=Path("/var/lib/cogbert"),
                                   bundle=Path("model.safetensors"))).start()
    state = device.policy.initial_state()
    d = device.act("unit-1", obs, state)     # decides and logs
    device.reward("unit-1", r, done=False)
    state = d.state

Decisions never wait for the network or the disk: logging frames a record into memory,
the outbox's writer thread stores it, the uploader's thread sends it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._log import event
from .experience import ExperienceLog
from .link import LinkSettings, MqttLink
from .outbox import Outbox, OutboxSettings
from .policy import Decision, Policy, State
from .topics import check_device_id, check_fleet, device_topic
from .updater import UpdateAgent, UpdateSettings
from .uploader import Uploader, UploaderSettings

__all__ = ["Device", "DeviceSettings"]

log = logging.getLogger("cogbert.device")


@dataclass
class DeviceSettings:
    device_id: str
    spool: Path
    bundle: Path
    fleet: str = "default"
    broker: str = "mqtts://localhost:8883"
    pki: Path | None = None                 # standard layout; or give the three files below
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    backend: str = "auto"
    invalid_obs: str = "raise"
    snapshot_every: int = 64
    reward_delay: int = 0
    telemetry_interval: float = 10.0
    outbox: dict = field(default_factory=dict)     # OutboxSettings overrides
    uploader: UploaderSettings = field(default_factory=UploaderSettings)
    link: dict = field(default_factory=dict)       # LinkSettings overrides
    seed: int | None = None
    model_name: str = "cogbert"                    # what releases must name to be installed
    trust_root: Path | None = None                 # root.json: enables signed updates
    update: dict = field(default_factory=dict)     # UpdateSettings overrides


class Device:
    def __init__(self, s: DeviceSettings) -> None:
        self.s = s
        check_device_id(s.device_id)
        check_fleet(s.fleet)
        self.updater: UpdateAgent | None = None
        self._boot_note: str | None = None
        if s.trust_root is not None:
            self.updater = UpdateAgent(UpdateSettings(Path(s.spool) / "update", model=s.model_name, fleet=s.fleet,
                                                      **s.update),
                                       Path(s.trust_root).read_bytes(), factory_bundle=s.bundle, backend=s.backend)
            self.policy, self._boot_note = self.updater.boot()
        else:
            self.policy = Policy.load(s.bundle, s.backend, invalid_obs=s.invalid_obs, seed=s.seed)
        self.outbox = Outbox(OutboxSettings(Path(s.spool) / "outbox", **s.outbox))
        self.log = ExperienceLog(self.outbox, model=self.policy.model_id, snapshot_every=s.snapshot_every,
                                 reward_delay=s.reward_delay)
        if s.pki is not None:
            ls = LinkSettings.for_device(s.broker, s.pki, s.device_id, **s.link)
        else:
            ls = LinkSettings(broker=s.broker, ca_file=s.ca_file, cert_file=s.cert_file, key_file=s.key_file,
                              client_id=s.device_id, **s.link)
        self.link = MqttLink(ls, name=s.device_id)
        self.uploader = Uploader(self.outbox, self.link, fleet=s.fleet, device=s.device_id, settings=s.uploader)
        self._lat: list[float] = []
        self._lock = threading.Lock()
        self.decisions = self.errors = self.nonfinite = self.state_resets = self.swaps = 0
        self.reward_sum, self.reward_count = 0.0, 0
        self._stop = threading.Event()
        self._telemetry = threading.Thread(target=self._telemetry_loop, name=f"cogbert-telemetry-{s.device_id}",
                                           daemon=True)

    def start(self) -> "Device":
        self.link.start()
        self.uploader.start()
        if self.updater is not None:
            self.updater.attach(swap=self.swap, report=self._report_status)
            on_release = lambda m: self.updater.on_message(m.payload, self.policy)  # noqa: E731
            self.link.subscribe(device_topic(self.s.fleet, self.s.device_id, "release"), on_release)
            self.link.subscribe(f"cogbert/v1/{self.s.fleet}/release", on_release)
            if self._boot_note:
                self.updater._status(None, self._boot_note)
        self._telemetry.start()
        return self

    def swap(self, policy: Policy) -> None:
        """Use ``policy`` from the next decision on. One reference assignment: a decision in
        progress finishes on the model it started with, and nothing waits."""
        if self.updater is not None:
            with self._lock:
                recent = self._lat[-500:]
            self.updater.baseline_latency_us = np.asarray(recent) * 1e6 if len(recent) >= 20 else None
        self.policy = policy
        self.swaps += 1

    def act(self, session: str, obs: np.ndarray, state: State, *, deterministic: bool = False) -> Decision:
        """Decide with the current policy and log the decision for upload.

        A state whose size does not fit the current model (a swap to another hidden size) is
        replaced by the model's initial state."""
        policy = self.policy
        if state.h.shape[-1] != policy.config.hidden:
            state = policy.initial_state(state.batch)
            self.state_resets += 1
        t0 = time.perf_counter()
        try:
            d = policy.act(obs, state, deterministic=deterministic)
        except Exception:
            with self._lock:
                self.errors += 1
            self._observe(policy, time.perf_counter() - t0, ok=False, finite=True)
            raise
        dt = time.perf_counter() - t0
        finite = math.isfinite(d.value) and math.isfinite(d.log_prob)
        if finite:
            self.log.decision(session, obs, d, state, deterministic=deterministic, model=policy.model_id)
        else:
            self.nonfinite += 1      # garbage for training: counted, not logged
        with self._lock:
            self.decisions += 1
            self._lat.append(dt)
            if len(self._lat) > 4096:
                del self._lat[:2048]
        self._observe(policy, dt, ok=True, finite=finite)
        return d

    def _observe(self, policy: Policy, dt: float, *, ok: bool, finite: bool) -> None:
        if self.updater is not None and self.updater.trial is not None:
            fallback = self.updater.observe(policy, dt, ok, finite)
            if fallback is not None:
                self.swap(fallback)

    def _report_status(self, status: dict) -> None:
        report = {"device": self.s.device_id, "model": self.policy.model_id, **status}
        self.link.publish(device_topic(self.s.fleet, self.s.device_id, "status"), json.dumps(report).encode(), qos=1)

    def reward(self, session: str, value: float, *, done: bool = False, truncated: bool = False) -> None:
        self.log.reward(session, value, done=done, truncated=truncated)
        with self._lock:
            self.reward_sum += float(value)
            self.reward_count += 1

    def telemetry(self) -> dict:
        with self._lock:
            lat = list(self._lat)
            decisions, errors = self.decisions, self.errors
        p95 = float(np.percentile(lat, 95) * 1e6) if lat else None
        return {"device": self.s.device_id, "model": self.policy.model_id, "time": time.time(),
                "decisions": decisions, "errors": errors, "nonfinite": self.nonfinite,
                "reward_sum": self.reward_sum, "reward_count": self.reward_count,
                "sanitized": self.policy.sanitized, "swaps": self.swaps, "state_resets": self.state_resets,
                "release": (self.updater.state.get("current") or {}).get("counter") if self.updater else None,
                "latency_p95_us": p95, "outbox": self.outbox.stats(),
                "uploader": {"sent": self.uploader.sent, "resent": self.uploader.resent,
                             "acked": self.uploader.acked, "rejected": self.uploader.rejected},
                "late_rewards": self.log.late_rewards, "link": self.link.state.value}

    def _telemetry_loop(self) -> None:
        topic = device_topic(self.s.fleet, self.s.device_id, "telemetry")
        while not self._stop.wait(self.s.telemetry_interval):
            try:
                self.link.publish(topic, json.dumps(self.telemetry()).encode(), qos=0)
            except Exception as e:  # noqa: BLE001 - telemetry must never hurt the device
                event(log, "telemetry_failed", level=logging.WARNING, device=self.s.device_id, error=str(e))

    def drained(self) -> bool:
        """Every decision logged so far is stored in the cloud."""
        return self.uploader.idle() and self.outbox.acked_seq >= self.outbox.last_seq

    def close(self, *, flush: bool = True) -> None:
        self._stop.set()
        if flush:
            self.log.flush()
        self.uploader.stop()
        self.link.close()
        self.outbox.close()
