"""What the update agent keeps across reboots: ``state.json`` in its directory.

``highest_counter`` is the anti-rollback floor (the highest release counter ever accepted);
``current`` is the model to boot, ``last_good`` the one to fall back to, and ``trial`` a model
on trial (set before the swap, cleared at commit or rollback, so a trial found open at boot
means the device died during it). The file is written as temp file, fsync, rename, fsync of
the directory, so a crash at any point leaves either the old state or the new one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cogbert_edge._internal.fs import atomic_write, fsync_path

__all__ = ["InstalledModel", "AgentState"]


@dataclass(frozen=True)
class InstalledModel:
    """A verified bundle in ``models/{sha256}.safetensors`` and the release that named it."""

    counter: int
    sha256: str
    model_id: str
    manifest_sha256: str

    @classmethod
    def from_dict(cls, d: Any) -> InstalledModel | None:
        if not isinstance(d, dict):
            return None
        return cls(int(d["counter"]), str(d["sha256"]), str(d.get("model_id", "")), str(d.get("manifest_sha256", "")))


@dataclass(frozen=True)
class AgentState:
    highest_counter: int = 0
    current: InstalledModel | None = None
    last_good: InstalledModel | None = None
    trial: InstalledModel | None = None

    def with_trial(self, model: InstalledModel) -> AgentState:
        return replace(self, highest_counter=model.counter, trial=model, last_good=self.current)

    def committed(self) -> AgentState:
        return replace(self, current=self.trial, last_good=self.trial, trial=None)

    def rolled_back(self, previous: InstalledModel | None) -> AgentState:
        return replace(self, trial=None, current=previous, last_good=previous)

    @classmethod
    def load(cls, path: Path) -> AgentState:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        return cls(int(d.get("highest_counter", 0)), InstalledModel.from_dict(d.get("current")),
                   InstalledModel.from_dict(d.get("last_good")), InstalledModel.from_dict(d.get("trial")))

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self)).encode())
        fsync_path(path.parent)
