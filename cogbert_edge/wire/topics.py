"""The MQTT topic map, version 1, and the rules for the names that appear in it.

:data:`TOPIC_MAP` is the map: each topic, its direction, the message it carries
(``records``/``batch`` for experience, ``messages`` for the rest), its encoding and QoS.
``docs/architecture.md`` shows :func:`render_topic_map` and a test keeps the two equal.

The broker's ACLs (``cogbert broker config``) give device ``D`` write access to exactly its
three upward topics and read access to its two downward topics and its fleet's release
topic, keyed on the certificate's common name, never on the client id.

A device certificate also names its site (subject L) and its site role (subject title:
"agent" or "coordinator"). The broker's ``cogbert_acl`` plugin lets a member of site S publish
``msg`` under its own name only, the coordinator alone publish ``decision``, and members of S
alone subscribe to and receive S's topics. "_site" can never be a device id (ids start with a
letter or digit), so the level cannot collide with a device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cogbert_edge.errors import ConfigError

__all__ = ["PREFIX", "UP", "DOWN", "TOPIC_MAP", "Topic", "check_device_id", "check_fleet", "device_topic",
           "fleet_release", "parse_device_topic", "render_topic_map",
           "SITE_LEVEL", "SITE_KINDS", "SITE_ROLES", "check_site", "site_topic", "site_filter", "parse_site_topic"]

PREFIX = "cogbert/v1"


@dataclass(frozen=True)
class Topic:
    pattern: str
    direction: Literal["up", "down", "site"]     # site: between the agents of a site and its coordinator
    message: str            # the class that encodes and decodes it
    encoding: str
    qos: int
    what: str


TOPIC_MAP: tuple[Topic, ...] = (
    Topic(PREFIX + "/{fleet}/{device}/exp", "up", "wire.batch (encode_run, decode)", "CBX1 columnar", 1,
          "experience batches"),
    Topic(PREFIX + "/{fleet}/{device}/telemetry", "up", "wire.messages.Telemetry", "JSON", 0,
          "decision counters and latency, outbox depth"),
    Topic(PREFIX + "/{fleet}/{device}/status", "up", "wire.messages.StatusReport", "JSON", 1,
          "update agent status reports"),
    Topic(PREFIX + "/{fleet}/{device}/ack", "down", "wire.messages.Ack", "msgpack", 1,
          "end-to-end acks of stored batches"),
    Topic(PREFIX + "/{fleet}/{device}/release", "down", "wire.messages.ReleaseOffer, Chunk", "msgpack", 1,
          "release offers for this device"),
    Topic(PREFIX + "/{fleet}/release", "down", "wire.messages.ReleaseOffer", "msgpack", 1,
          "the fleet's retained release offer"),
    Topic(PREFIX + "/{fleet}/_site/{site}/{member}/msg", "site", "wire.messages.AgentMessage", "msgpack", 0,
          "an agent's proposal for a step"),
    Topic(PREFIX + "/{fleet}/_site/{site}/{member}/decision", "site", "wire.messages.SiteDecision", "msgpack", 0,
          "the site coordinator's answer"),
)

UP = tuple(t.pattern.rsplit("/", 1)[1] for t in TOPIC_MAP if t.direction == "up" and "{device}" in t.pattern)
DOWN = tuple(t.pattern.rsplit("/", 1)[1] for t in TOPIC_MAP if t.direction == "down" and "{device}" in t.pattern)


def render_topic_map() -> str:
    """The topic map as the fixed-width table ``docs/architecture.md`` shows."""
    rows = [("topic", "dir", "message", "encoding", "QoS", "carries")]
    rows += [(t.pattern, t.direction, t.message, t.encoding, str(t.qos), t.what) for t in TOPIC_MAP]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
                     for r in rows).rstrip()

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


# -- the site level (multi-agent sites, docs/multi-agent.md) -----------------------------------

SITE_LEVEL = "_site"
SITE_KINDS = ("msg", "decision")
SITE_ROLES = ("agent", "coordinator")


def check_site(site: str) -> str:
    if not isinstance(site, str) or not _DEVICE_RE.match(site):
        raise ConfigError(f"invalid site name {site!r}: use 1-64 letters, digits, '-' or '_'")
    return site


def _check_site_kind(kind: str) -> str:
    if kind not in SITE_KINDS:
        raise ConfigError(f"unknown site topic kind {kind!r}; one of {SITE_KINDS}")
    return kind


def site_topic(fleet: str, site: str, member: str, kind: str) -> str:
    """The topic member ``member`` of ``site`` publishes its ``kind`` on."""
    return f"{PREFIX}/{check_fleet(fleet)}/{SITE_LEVEL}/{check_site(site)}/{check_device_id(member)}/" \
           f"{_check_site_kind(kind)}"


def site_filter(fleet: str, site: str, kind: str) -> str:
    """The subscription to every member's ``kind`` at ``site``."""
    return f"{PREFIX}/{check_fleet(fleet)}/{SITE_LEVEL}/{check_site(site)}/+/{_check_site_kind(kind)}"


def parse_site_topic(topic: str) -> tuple[str, str, str, str] | None:
    """``(fleet, site, member, kind)`` of a site topic, or None if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) != 7 or "/".join(parts[:2]) != PREFIX or parts[3] != SITE_LEVEL or parts[6] not in SITE_KINDS:
        return None
    if not all(_DEVICE_RE.match(p) for p in (parts[2], parts[4], parts[5])):
        return None
    return parts[2], parts[4], parts[5], parts[6]
