"""The site level of the MQTT topic map (multi-agent sites, ``docs/multi-agent.md``).

Kept beside :mod:`cogbert_edge.wire.topics` (which re-exports it once the typed topic map has
landed) and enforced by the broker's ``cogbert_acl`` plugin.
"""

from __future__ import annotations

import re

from cogbert_edge.errors import ConfigError
from cogbert_edge.wire.topics import PREFIX, check_device_id, check_fleet

__all__ = ["SITE_LEVEL", "SITE_KINDS", "SITE_ROLES", "check_site", "site_topic", "site_filter", "parse_site_topic"]

_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

#
#     cogbert/v1/{fleet}/_site/{site}/{member}/msg        an agent's coordination message
#     cogbert/v1/{fleet}/_site/{site}/{member}/decision   the site coordinator's answer
#
# A device certificate names its site (subject L) and its site role (subject title:
# "agent" or "coordinator"). The broker lets a member of site S publish ``msg`` under its own
# name only, the coordinator alone publish ``decision``, and members of S alone subscribe to
# and receive S's topics (``.../_site/S/+/msg`` and ``.../+/decision``). "_site" can never be a
# device id (ids start with a letter or digit), so the level cannot collide with a device.

SITE_LEVEL = "_site"
SITE_KINDS = ("msg", "decision")
SITE_ROLES = ("agent", "coordinator")


def check_site(site: str) -> str:
    if not isinstance(site, str) or not _DEVICE_RE.match(site):
        raise ConfigError(f"invalid site name {site!r}: use 1-64 letters, digits, '-' or '_'")
    return site


def site_topic(fleet: str, site: str, member: str, kind: str) -> str:
    """The topic member ``member`` of ``site`` publishes its ``kind`` on."""
    if kind not in SITE_KINDS:
        raise ConfigError(f"unknown site topic kind {kind!r}; one of {SITE_KINDS}")
    return f"{PREFIX}/{check_fleet(fleet)}/{SITE_LEVEL}/{check_site(site)}/{check_device_id(member)}/{kind}"


def site_filter(fleet: str, site: str, kind: str) -> str:
    """The subscription to every member's ``kind`` at ``site``."""
    if kind not in SITE_KINDS:
        raise ConfigError(f"unknown site topic kind {kind!r}; one of {SITE_KINDS}")
    return f"{PREFIX}/{check_fleet(fleet)}/{SITE_LEVEL}/{check_site(site)}/+/{kind}"


def parse_site_topic(topic: str) -> tuple[str, str, str, str] | None:
    """``(fleet, site, member, kind)`` of a site topic, or None if ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) != 7 or "/".join(parts[:2]) != PREFIX or parts[3] != SITE_LEVEL or parts[6] not in SITE_KINDS:
        return None
    if not all(_DEVICE_RE.match(p) for p in (parts[2], parts[4], parts[5])):
        return None
    return parts[2], parts[4], parts[5], parts[6]
