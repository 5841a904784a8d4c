"""The MQTT topic map, version 1, and the rules for the names that appear in it.

    cogbert/v1/{fleet}/{device}/exp         up    experience batches
    cogbert/v1/{fleet}/{device}/telemetry   up    metrics: decision latency, errors, outbox depth
    cogbert/v1/{fleet}/{device}/status      up    update agent status reports
    cogbert/v1/{fleet}/{device}/ack         down  end-to-end acknowledgements of stored batches
    cogbert/v1/{fleet}/{device}/release     down  release manifests for this device
    cogbert/v1/{fleet}/release              down  the fleet's retained release manifest

The broker's ACLs (``cogbert broker config``) give device ``D`` write access to exactly its
three upward topics and read access to its two downward topics and its fleet's release
topic, keyed on the certificate's common name, never on the client id.
"""

from __future__ import annotations

import re

from cogbert_edge.errors import ConfigError

__all__ = ["PREFIX", "UP", "DOWN", "check_device_id", "check_fleet", "device_topic", "fleet_release",
           "parse_device_topic"]

PREFIX = "cogbert/v1"
UP = ("exp", "telemetry", "status")
DOWN = ("ack", "release")

# Device ids become certificate common names, MQTT usernames (via use_identity_as_username)
# and topic levels: no '/', '+', '#', no '.' or ':' (reserved for service identities), and
# short enough for every broker.
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_FLEET_RE = _DEVICE_RE


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ConfigError(f"invalid device id {device!r}: use 1-64 letters, digits, '-' or '_', "
                          "starting with a letter or digit")
    return device


def check_fleet(fleet: str) -> str:
    if not isinstance(fleet, str) or not _FLEET_RE.match(fleet):
        raise ConfigError(f"invalid fleet name {fleet!r}: use 1-64 letters, digits, '-' or '_'")
    return fleet


def device_topic(fleet: str, device: str, kind: str) -> str:
    if kind not in UP + DOWN:
        raise ConfigError(f"unknown topic kind {kind!r}; one of {UP + DOWN}")
    return f"{PREFIX}/{check_fleet(fleet)}/{check_device_id(device)}/{kind}"


def fleet_release(fleet: str) -> str:
    return f"{PREFIX}/{check_fleet(fleet)}/release"


def parse_device_topic(topic: str) -> tuple[str, str, str] | None:
    """``(fleet, device, kind)`` of a device topic, or None if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != PREFIX or parts[4] not in UP + DOWN:
        return None
    if not _FLEET_RE.match(parts[2]) or not _DEVICE_RE.match(parts[3]):
        return None
    return parts[2], parts[3], parts[4]
