"""The model registry and the audit log, both in the object store.

Each release is a record at ``registry/releases/{counter:08d}.json`` next to its files:

    releases/{counter}/model.safetensors    the bundle devices download
    releases/{counter}/manifest.json        its signed manifest
    releases/{counter}/rollback.json        (optional) a pre-signed fleet rollback to the
                                            stable bundle, counter + 1: what an abort publishes

A record holds the release's lineage (parent model, the release it was trained from), its
training and evaluation metrics, and its state:

    candidate -> canary -> stable -> retired
                       \\-> rolled_back

Every state change, rollout decision and operator action is also written to the audit log:
one object per event, ``audit/{yyyy-mm-dd}/{time_ns:020d}-{n}.json``, never overwritten
(append-only on any object store).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from cogbert_cloud.data import keys
from cogbert_cloud.data.store import ObjectStore
from cogbert_cloud.errors import RegistryError, ReleaseConflict, ReleaseNotFound, StoreError
from cogbert_edge.inference.bundle import load_bundle

__all__ = ["Registry", "AuditLog", "STATES", "RegistryError"]

STATES = ("candidate", "canary", "stable", "rolled_back", "retired")
_TRANSITIONS = {"candidate": {"canary", "stable", "retired"}, "canary": {"stable", "rolled_back"},
                "stable": {"retired"}, "rolled_back": set(), "retired": set()}


class AuditLog:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._n = itertools.count()
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict:
        now = time.time_ns()
        entry = {"time": dt.datetime.fromtimestamp(now / 1e9, dt.timezone.utc).isoformat(), "time_s": now / 1e9,
                 "event": event, **fields}
        day = dt.datetime.fromtimestamp(now / 1e9, dt.timezone.utc).strftime("%Y-%m-%d")
        with self._lock:
            key = keys.audit_entry(day, now, next(self._n))
        if self.store.exists(key):       # append-only: never overwrite an entry
            raise StoreError(f"audit entry {key} exists")
        self.store.put(key, json.dumps(entry, sort_keys=True).encode())
        return entry

    def entries(self) -> Iterator[dict]:
        for key in sorted(self.store.list(keys.AUDIT_PREFIX)):
            yield json.loads(self.store.get(key))


class Registry:
    def __init__(self, store: ObjectStore, audit: AuditLog | None = None) -> None:
        self.store = store
        self.audit = audit or AuditLog(store)
        self._lock = threading.Lock()

    # -- releases -----------------------------------------------------------------------------

    def add(self, counter: int, bundle: bytes, manifest: bytes, *, rollback: bytes | None = None,
            parent_release: int | None = None, train: dict | None = None, evaluation: dict | None = None,
            state: str = "candidate", actor: str = "system") -> dict:
        """Register a signed release (the signing happened elsewhere)."""
        b = load_bundle(bundle)
        with self._lock:
            if self.store.exists(self._key(counter)):
                raise ReleaseConflict(f"release {counter} is already registered")
            self.store.put(keys.release_bundle(counter), bundle)
            self.store.put(keys.release_manifest(counter), manifest)
            if rollback is not None:
                self.store.put(keys.release_rollback(counter), rollback)
            rec = {"counter": counter, "model_id": b.model_id, "parent_model": b.parent,
                   "parent_release": parent_release, "sha256": hashlib.sha256(bundle).hexdigest(),
                   "bytes": len(bundle), "quant": b.quant_label, "state": state, "train": train or {},
                   "evaluation": evaluation or {}, "created": _now(), "history": [{"state": state, "time": _now()}],
                   "has_rollback": rollback is not None}
            self._write(rec)
        self.audit.record("release_registered", counter=counter, model_id=b.model_id, state=state, actor=actor)
        return rec

    def get(self, counter: int) -> dict:
        try:
            return json.loads(self.store.get(self._key(counter)))
        except StoreError:
            raise ReleaseNotFound(f"no release {counter}") from None

    def list(self) -> list[dict]:
        return [json.loads(self.store.get(k)) for k in sorted(self.store.list(keys.REGISTRY_PREFIX))]

    def stable(self) -> dict | None:
        stable = [r for r in self.list() if r["state"] == "stable"]
        return max(stable, key=lambda r: r["counter"]) if stable else None

    def next_counter(self) -> int:
        """Above every release and every pre-signed rollback."""
        top = 0
        for r in self.list():
            top = max(top, r["counter"] + (1 if r.get("has_rollback") else 0))
        return top + 1

    def files(self, counter: int) -> tuple[bytes, bytes]:
        return self.store.get(keys.release_bundle(counter)), self.store.get(keys.release_manifest(counter))

    def rollback_manifest(self, counter: int) -> bytes | None:
        key = keys.release_rollback(counter)
        return self.store.get(key) if self.store.exists(key) else None

    def set_state(self, counter: int, state: str, *, reason: str = "", actor: str = "system", **fields: Any) -> dict:
        if state not in STATES:
            raise ReleaseConflict(f"unknown state {state!r}")
        with self._lock:
            rec = self.get(counter)
            if state not in _TRANSITIONS[rec["state"]]:
                raise ReleaseConflict(f"release {counter} cannot go from {rec['state']} to {state}")
            old = rec["state"]
            rec["state"] = state
            rec["history"].append({"state": state, "time": _now(), "reason": reason})
            rec.update(fields)
            self._write(rec)
        self.audit.record("release_state", counter=counter, old=old, new=state, reason=reason, actor=actor)
        return rec

    def update(self, counter: int, **fields: Any) -> dict:
        with self._lock:
            rec = self.get(counter)
            rec.update(fields)
            self._write(rec)
        return rec

    def _write(self, rec: dict) -> None:
        self.store.put(self._key(rec["counter"]), json.dumps(rec, sort_keys=True, indent=1).encode())

    @staticmethod
    def _key(counter: int) -> str:
        return keys.registry_record(counter)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
