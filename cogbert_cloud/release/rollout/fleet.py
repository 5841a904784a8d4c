"""The fleet as the rollout sees it: each device's latest telemetry and its status reports,
read from the MQTT topics, and the device's place in the fleet's cohorts."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cogbert_edge._internal.log import event
from cogbert_edge.errors import WireError
from cogbert_edge.link.mqtt import Message, MqttLink
from cogbert_edge.wire.messages import StatusReport, Telemetry
from cogbert_edge.wire.topics import PREFIX, check_fleet, parse_device_topic

__all__ = ["FleetView", "DeviceRecord", "ReceivedStatus", "bucket"]

log = logging.getLogger("cogbert.rollout")

_REWARD_HISTORY = 1000      # telemetry reports kept per device for the reward test
_STATUS_HISTORY = 50


def bucket(fleet: str, device: str) -> float:
    """The device's place in [0, 100): stable across runs and controllers."""
    return int(hashlib.sha256(f"{fleet}:{device}".encode()).hexdigest()[:8], 16) % 10000 / 100.0


@dataclass(frozen=True)
class ReceivedStatus:
    report: StatusReport
    received: float                 # the controller's clock when it arrived


@dataclass
class DeviceRecord:
    telemetry: Telemetry | None = None
    last_seen: float = 0.0
    statuses: list[ReceivedStatus] = field(default_factory=list)
    # (received, reward_sum, reward_count) of each telemetry report, for the reward test
    rewards: list[tuple[float, float, int]] = field(default_factory=list)

    def copy(self) -> DeviceRecord:
        return dataclasses.replace(self, statuses=list(self.statuses), rewards=list(self.rewards))


class FleetView:
    """Every device's latest telemetry and its status reports."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceRecord] = {}
        self._lock = threading.Lock()
        self.malformed = 0          # reports that did not decode (counted, then dropped)

    def on_telemetry(self, device: str, t: Telemetry, now: float | None = None) -> None:
        with self._lock:
            d = self._devices.setdefault(device, DeviceRecord())
            d.telemetry = t
            d.last_seen = now if now is not None else time.time()
            if t.reward_ok:
                d.rewards.append((d.last_seen, t.reward_sum, t.reward_count))
                del d.rewards[:-_REWARD_HISTORY]

    def on_status(self, device: str, s: StatusReport, now: float | None = None) -> None:
        with self._lock:
            d = self._devices.setdefault(device, DeviceRecord())
            d.last_seen = now if now is not None else time.time()
            d.statuses.append(ReceivedStatus(s, d.last_seen))
            del d.statuses[:-_STATUS_HISTORY]

    def snapshot(self) -> dict[str, DeviceRecord]:
        """A copy that later reports do not change."""
        with self._lock:
            return {k: v.copy() for k, v in self._devices.items()}

    def attach(self, link: MqttLink, fleet: str) -> None:
        check_fleet(fleet)

        def handler(kind: str) -> Callable[[Message], None]:
            def on(m: Message) -> None:
                where = parse_device_topic(m.topic)
                if where is None:
                    return
                try:
                    if kind == "telemetry":
                        self.on_telemetry(where[1], Telemetry.decode(m.payload))
                    else:
                        self.on_status(where[1], StatusReport.decode(m.payload))
                except WireError as e:
                    self.malformed += 1
                    event(log, "malformed_report", level=logging.WARNING, device=where[1], kind=kind,
                          error=str(e)[:200])
            return on
        link.subscribe(f"{PREFIX}/{fleet}/+/telemetry", handler("telemetry"), qos=0)
        link.subscribe(f"{PREFIX}/{fleet}/+/status", handler("status"))
