"""A connected Cogbert device: the policy, its experience log and outbox, the uploader, the MQTT
link, signed updates and telemetry, wired together.

    with Device(DeviceSettings(device_id="press-7", fleet="plant", broker="mqtts://broker:8883",
                               pki=Path("pki"), spool=Path("/var/lib/cogbert"),
                               bundle=Path("factory.safetensors"),
                               trust_root=Path("root.json"))) as device:
        d = device.act("unit-1", obs)            # decides with the current model and logs it
        apply(d.action)
        device.reward("unit-1", r, step=d.step)  # whenever the outcome is known

Decisions never wait for the network or the disk: logging frames a record into memory, the
outbox's writer thread stores it, the uploader's thread sends it, and an update is verified and
installed on its own thread, then swapped in between two decisions. ``docs/device-sdk.md``
describes the lifecycle, the threads, what is written to disk and what happens offline, on a
full disk and on a bad update.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError
from cogbert_edge.experience.log import ExperienceLog
from cogbert_edge.experience.outbox import Outbox, OutboxSettings
from cogbert_edge.experience.uploader import Uploader, UploaderSettings
from cogbert_edge.inference.policy import INVALID_OBS_POLICIES, Decision, Policy, State
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from cogbert_edge.update.agent import UpdateAgent, UpdateSettings
from cogbert_edge.wire.messages import OutboxTelemetry, StatusReport, Telemetry, UploaderTelemetry
from cogbert_edge.wire.topics import check_device_id, check_fleet, device_topic, fleet_release

__all__ = ["Device", "DeviceSettings", "LoggedDecision"]

log = logging.getLogger("cogbert.device")


@dataclass
class DeviceSettings:
    """Who the device is, where it keeps its files, and how it reaches the fleet.

    The nested settings tune one part each; the fields that only the device can know (the
    outbox and update directories under ``spool``, the link's broker, certificate files and
    client id, the update agent's model and fleet) are set by the device and need not be given.
    """

    device_id: str                          # certificate CN, MQTT user, topic level
    spool: Path                             # durable state: outbox, update agent, models
    bundle: Path                            # the factory model, used until a release is installed
    fleet: str = "default"
    broker: str = "mqtts://localhost:8883"  # the broker's device listener
    pki: Path | None = None                 # PKI layout: pki/ca.pem, pki/devices/ID/{cert,key}.pem
    ca_file: Path | None = None             # ... or the three files themselves
    cert_file: Path | None = None
    key_file: Path | None = None
    backend: str | None = None              # None: $COGBERT_BACKEND, else "auto" (the fastest here)
    invalid_obs: str = "raise"              # or "sanitize" (see Policy)
    seed: int | None = None                 # sampling; None: from the OS
    snapshot_every: int = 64                # log the recurrent state every this many steps of a session
    reward_delay: int = 0                   # decisions a reward may still reach after the next one
    telemetry_interval: float = 10.0        # seconds between telemetry messages
    model_name: str = "cogbert"             # what releases must name to be installed here
    trust_root: Path | None = None          # root.json of the fleet's release keys: enables updates
    # Python's full collection scans every tracked object under the GIL: over the ~50k objects
    # of a started device (numpy, cryptography, paho, the SDK) it took 20-37 ms on a 2-core
    # machine, a stall of one decision whenever it ran (at a trial's end, in cogbert-bench swap).
    # Freezing what is alive at start takes those objects out of every later collection, as
    # pre-fork servers do; the cost is that they are never collected (docs/device-sdk.md).
    freeze_gc: bool = True
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    uploader: UploaderSettings = field(default_factory=UploaderSettings)
    link: LinkSettings = field(default_factory=LinkSettings)
    update: UpdateSettings = field(default_factory=UpdateSettings)

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        check_fleet(self.fleet)
        if self.invalid_obs not in INVALID_OBS_POLICIES:
            raise ConfigError(f"invalid_obs must be one of {INVALID_OBS_POLICIES}, got {self.invalid_obs!r}")
        if self.pki is None and None in (self.ca_file, self.cert_file, self.key_file):
            raise ConfigError("a device needs its identity: give pki= (a PKI directory) or ca_file=, "
                              "cert_file= and key_file=")
        if self.reward_delay < 0 or self.snapshot_every < 1 or self.telemetry_interval <= 0:
            raise ConfigError("need reward_delay >= 0, snapshot_every >= 1 and telemetry_interval > 0")


@dataclass(frozen=True)
class LoggedDecision(Decision):
    """A :class:`Decision` the device logged: ``step`` is its index in the session's episode,
    which :meth:`Device.reward` accepts to credit a delayed reward to this decision."""

    session: str
    step: int


class Device:
    """Decides with the fleet's current model, logs every decision for the cloud, uploads the
    log over mutual-TLS MQTT, and installs signed updates with a trial and automatic rollback.

    ``act``, ``reward`` and ``end_session`` may be called from any number of threads. The
    recurrent state of each session is kept by the device unless the caller passes its own.
    """

    def __init__(self, settings: DeviceSettings) -> None:
        s = self.settings = settings
        spool = Path(s.spool)
        self.updater: UpdateAgent | None = None
        self._boot_note: str | None = None
        if s.trust_root is not None:
            update = dataclasses.replace(s.update, directory=spool / "update", model=s.model_name, fleet=s.fleet)
            self.updater = UpdateAgent(update, Path(s.trust_root).read_bytes(), factory_bundle=s.bundle,
                                       backend=s.backend)
            self.policy, self._boot_note = self.updater.boot()
        else:
            self.policy = Policy.load(s.bundle, s.backend, invalid_obs=s.invalid_obs, seed=s.seed)
        self.outbox = Outbox(dataclasses.replace(s.outbox, directory=spool / "outbox"))
        self.log = ExperienceLog(self.outbox, model=self.policy.model_id, snapshot_every=s.snapshot_every,
                                 reward_delay=s.reward_delay)
        if s.pki is not None:
            base = LinkSettings.for_device(s.broker, s.pki, s.device_id)
            ca_file, cert_file, key_file = base.ca_file, base.cert_file, base.key_file
        else:
            ca_file, cert_file, key_file = s.ca_file, s.cert_file, s.key_file
        _check_identity(cert_file, s.device_id, s.fleet)
        self.link = MqttLink(dataclasses.replace(s.link, broker=s.broker, client_id=s.device_id, ca_file=ca_file,
                                                 cert_file=cert_file, key_file=key_file),
                             name=s.device_id)
        self.uploader = Uploader(self.outbox, self.link, fleet=s.fleet, device=s.device_id, settings=s.uploader)
        self._lat: list[float] = []
        self._lock = threading.Lock()
        self._states: dict[str, State] = {}
        self._boot = secrets.token_hex(8)
        self.decisions = self.errors = self.nonfinite = self.state_resets = self.swaps = 0
        self.reward_sum, self.reward_count = 0.0, 0
        self._stop = threading.Event()
        self._started = False
        self._telemetry = threading.Thread(target=self._telemetry_loop, name=f"cogbert-telemetry-{s.device_id}",
                                           daemon=True)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Device:
        """Connect (in the background: the device decides while the broker is unreachable),
        start uploading, and listen for releases."""
        s = self.settings
        self.link.start()
        self.uploader.start()
        if self.updater is not None:
            updater = self.updater
            updater.attach(swap=self.swap, report=self._report_status)

            def on_release(m: Any) -> None:
                updater.on_message(m.payload, self.policy)

            self.link.subscribe(device_topic(s.fleet, s.device_id, "release"), on_release)
            self.link.subscribe(fleet_release(s.fleet), on_release)
            if self._boot_note:
                updater._status(None, self._boot_note)
        self._telemetry.start()
        if s.freeze_gc:
            gc.collect()        # garbage of the start-up is collected, not frozen
            gc.freeze()
        self._started = True
        return self

    def __enter__(self) -> Device:
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flush(self) -> None:
        """Log the decisions still waiting for rewards now (rewards arriving later for them are
        dropped and counted in ``late_rewards``), and make the outbox durable."""
        self.log.flush()
        self.outbox.flush()

    def drained(self) -> bool:
        """Every decision logged so far is stored in the cloud."""
        return self.uploader.idle() and self.outbox.acked_seq >= self.outbox.last_seq

    def close(self, *, flush: bool = True) -> None:
        """Stop. With ``flush`` (the default) the decisions still waiting for rewards are
        written to the outbox first; whatever is not uploaded yet is sent after the next start."""
        self._stop.set()
        if flush:
            self.log.flush()
        self.uploader.stop()
        self.link.close()
        self.outbox.close()

    # -- deciding ---------------------------------------------------------------------------

    def act(self, session: str, obs: Any, state: State | None = None, *,
            deterministic: bool = False) -> LoggedDecision:
        """Decide for ``session`` with the current model and log the decision for upload.

        Without ``state`` the device keeps the session's recurrent state itself (a new session
        starts from the initial state, and so does the next episode after a reward with
        ``done`` or ``truncated``). A state whose size does not fit the current model (after a
        swap to another hidden size) is replaced by the model's initial state."""
        policy = self.policy
        keep = state is None
        if state is None:
            with self._lock:
                state = self._states.get(session)
            if state is None:
                state = policy.initial_state()
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
            step = self.log.decision(session, obs, d, state, deterministic=deterministic, model=policy.model_id)
        else:
            step = -1
            self.nonfinite += 1      # garbage for training: counted, not logged
        with self._lock:
            self.decisions += 1
            self._lat.append(dt)
            if len(self._lat) > 4096:
                del self._lat[:2048]
            if keep:
                self._states[session] = d.state
        self._observe(policy, dt, ok=True, finite=finite)
        return LoggedDecision(d.action, d.log_prob, d.value, d.state, session, step)

    def reward(self, session: str, value: float, *, step: int | None = None, done: bool = False,
               truncated: bool = False) -> None:
        """Credit ``value`` to the session's latest decision (or to decision ``step``, while it is
        still open: see ``reward_delay``). ``done`` / ``truncated`` end the episode."""
        self.log.reward(session, value, done=done, truncated=truncated, step=step)
        with self._lock:
            self.reward_sum += float(value)
            self.reward_count += 1
            if done or truncated:
                self._states.pop(session, None)

    def end_session(self, session: str) -> None:
        """The session is over (without an episode end to report): log its open decisions and
        forget its state."""
        self.log.end_session(session)
        with self._lock:
            self._states.pop(session, None)

    def swap(self, policy: Policy) -> None:
        """Use ``policy`` from the next decision on. One reference assignment: a decision in
        progress finishes on the model it started with, and nothing waits."""
        if self.updater is not None:
            with self._lock:
                recent = self._lat[-500:]
            self.updater.baseline_latency_us = np.asarray(recent) * 1e6 if len(recent) >= 20 else None
        self.policy = policy
        self.swaps += 1

    def _observe(self, policy: Policy, dt: float, *, ok: bool, finite: bool) -> None:
        if self.updater is not None and self.updater.trial is not None:
            fallback = self.updater.observe(policy, dt, ok, finite)
            if fallback is not None:
                self.swap(fallback)

    # -- reporting --------------------------------------------------------------------------

    def _report_status(self, status: StatusReport) -> None:
        s = self.settings
        report = status.with_sender(s.device_id, self.policy.model_id)
        self.link.publish(device_topic(s.fleet, s.device_id, "status"), report.encode(), qos=1)

    def telemetry(self) -> Telemetry:
        """What the device reports on its telemetry topic every ``telemetry_interval`` seconds."""
        with self._lock:
            lat = list(self._lat)
            decisions, errors = self.decisions, self.errors
        p95 = float(np.percentile(lat, 95) * 1e6) if lat else None
        ob = self.outbox.stats()
        return Telemetry(
            device=self.settings.device_id, model=self.policy.model_id, time=time.time(),
            decisions=decisions, errors=errors, nonfinite=self.nonfinite,
            reward_sum=self.reward_sum, reward_count=self.reward_count,
            sanitized=self.policy.sanitized, swaps=self.swaps, state_resets=self.state_resets,
            release=self.updater.current_counter if self.updater else None, latency_p95_us=p95,
            outbox=OutboxTelemetry(pending=ob["pending"], bytes=ob["bytes"], segments=ob["segments"],
                                   last_seq=ob["last_seq"], acked_seq=ob["acked_seq"],
                                   dropped_oldest=ob["dropped_oldest"], dropped_unwritten=ob["dropped_unwritten"]),
            uploader=UploaderTelemetry(sent=self.uploader.sent, resent=self.uploader.resent,
                                       acked=self.uploader.acked, rejected=self.uploader.rejected),
            late_rewards=self.log.late_rewards, refused_records=self.log.refused,
            link=self.link.state.value, boot=self._boot)

    def _telemetry_loop(self) -> None:
        s = self.settings
        topic = device_topic(s.fleet, s.device_id, "telemetry")
        while not self._stop.wait(s.telemetry_interval):
            try:
                self.link.publish(topic, self.telemetry().encode(), qos=0)
            except Exception as e:  # noqa: BLE001 - telemetry must never hurt the device
                event(log, "telemetry_failed", level=logging.WARNING, device=s.device_id, error=str(e))


def _check_identity(cert_file: Path | None, device_id: str, fleet: str) -> None:
    """Refuse, with the reason, settings that the broker would refuse later in silence: a
    certificate for another device or another fleet (its CN is the device id, its OU the fleet)."""
    if cert_file is None or not Path(cert_file).is_file():
        return   # the link says so when it loads its TLS files
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        subject = x509.load_pem_x509_certificate(Path(cert_file).read_bytes()).subject
    except ValueError as e:
        raise ConfigError(f"{cert_file} is not a PEM certificate: {e}") from None
    cn = [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    ou = [a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if cn and cn[0] != device_id:
        raise ConfigError(f"{cert_file} is the certificate of device {cn[0]!r}, not {device_id!r}")
    if not ou:
        raise ConfigError(f"{cert_file} names no fleet: the broker refuses it; re-issue it with "
                          f"`cogbert pki issue-device PKI {device_id} --fleet {fleet}`")
    if ou[0] != fleet:
        raise ConfigError(f"{cert_file} is for fleet {ou[0]!r}, but the device is configured for fleet {fleet!r}")
