"""Device tags: labels an operator gives devices (a site, a line, a hardware revision) to
find them and to roll a release out to some of them first.

Tags are set at provisioning (``cogbert pki issue-device ... --tag line-a``, kept in the PKI's
``index.json``) or by the operator API (``PUT /v1/devices/{id}/tags``), and kept by the control
plane in the object store, one object for the fleet (``fleet/tags.json``): the PKI directory
stays offline, so ``cloud serve`` copies the tags it finds in the index it was given into the
store for devices that have none there yet. A tag is 1 to 64 characters of letters, digits,
``.``, ``_`` and ``-``; a device has at most 32.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from cogbert_cloud.data.store import ObjectStore
from cogbert_edge.errors import ConfigError

__all__ = ["DeviceTags", "check_tags", "TAGS_KEY"]

TAGS_KEY = "fleet/tags.json"
_TAG = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_TAGS = 32


def check_tags(tags: Iterable[str]) -> list[str]:
    """``tags`` sorted and without duplicates, or a :class:`ConfigError` naming the bad one."""
    out = sorted(set(tags))
    for t in out:
        if not isinstance(t, str) or not _TAG.match(t):
            raise ConfigError(f"tag {str(t)[:80]!r}: 1-64 letters, digits, '.', '_' or '-'")
    if len(out) > MAX_TAGS:
        raise ConfigError(f"{len(out)} tags: a device has at most {MAX_TAGS}")
    return out


class DeviceTags:
    """The fleet's device tags in the object store, cached in memory (one control plane writes them)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._tags: dict[str, list[str]] | None = None

    def _load(self) -> dict[str, list[str]]:
        if self._tags is None:
            raw = self.store.get(TAGS_KEY) if self.store.exists(TAGS_KEY) else b"{}"
            data = json.loads(raw)
            self._tags = {str(d): list(t) for d, t in data.items()} if isinstance(data, dict) else {}
        return self._tags

    def all(self) -> dict[str, list[str]]:
        with self._lock:
            return {d: list(t) for d, t in self._load().items()}

    def get(self, device: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._load().get(device, ()))

    def set(self, device: str, tags: Iterable[str]) -> list[str]:
        clean = check_tags(tags)
        with self._lock:
            cur = self._load()
            if clean:
                cur[device] = clean
            else:
                cur.pop(device, None)
            self.store.put(TAGS_KEY, json.dumps(cur, sort_keys=True).encode())
        return clean

    def import_pki(self, pki_dir: Path | None) -> int:
        """Copy the provisioning tags of ``pki_dir/index.json`` for devices without tags here."""
        index = Path(pki_dir) / "index.json" if pki_dir else None
        if index is None or not index.exists():
            return 0
        n = 0
        existing = self.all()
        for entry in json.loads(index.read_text()):
            if entry.get("kind") == "device" and entry.get("tags") and entry.get("name") not in existing:
                self.set(entry["name"], entry["tags"])
                existing[entry["name"]] = entry["tags"]
                n += 1
        return n
