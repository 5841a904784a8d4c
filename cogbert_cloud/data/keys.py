"""Every object-store key Cogbert writes or reads, in one place.

=========================================================  ========================================
key                                                        what
=========================================================  ========================================
``experience/{fleet}/{device}/{first:016d}-{last:016d}.cbx``  an experience batch: records first..last
``releases/{counter}/model.safetensors``                   a release's bundle
``releases/{counter}/manifest.json``                       its signed manifest
``releases/{counter}/rollback.json``                       the pre-signed rollback to the stable one
``registry/releases/{counter:08d}.json``                   the registry's record of a release
``audit/{YYYY-MM-DD}/{time_ns:020d}-{n:06d}.json``         one audit log entry (append-only)
``trust/roots/{version}.json``                             signed root versions after the first
``signing/requests/{counter}.json``                        a request to the signing service ...
``signing/bundles/{counter}.safetensors``                  ... with the bundle to sign ...
``signing/done/{counter}.json``                            ... and its answer, the signed manifest
``loop/{name}/init.safetensors``                           a learning round's starting model
``loop/{name}/{vtrace,ppo}/model.safetensors``             what each of its training stages made
=========================================================  ========================================

An experience key is a function of the records' identity alone (fleet, device, sequence
range), never of anything else a device sends: that is what makes a resent batch land on the
key it was stored under (docs/experience-pipeline.md). Zero-padded numbers keep a listing in
order. Keys are the same in a directory store and on S3.
"""

from __future__ import annotations

import re

__all__ = [
    "EXPERIENCE_PREFIX", "RELEASES_PREFIX", "REGISTRY_PREFIX", "AUDIT_PREFIX", "ROOTS_PREFIX",
    "SIGNING_REQUESTS_PREFIX", "PROBE",
    "experience_batch", "experience_prefix", "parse_experience_key",
    "release_bundle", "release_manifest", "release_rollback", "registry_record",
    "audit_entry", "root", "root_version", "signing_request", "signing_bundle", "signing_done",
    "signing_request_counter", "loop_init", "loop_prefix", "loop_model",
]

EXPERIENCE_PREFIX = "experience/"
RELEASES_PREFIX = "releases/"
REGISTRY_PREFIX = "registry/releases/"
AUDIT_PREFIX = "audit/"
ROOTS_PREFIX = "trust/roots/"
SIGNING_REQUESTS_PREFIX = "signing/requests/"
PROBE = "registry/.probe"          # read by readiness checks: the store answers

# An optional level between fleet and device is accepted when reading (an early layout).
_EXPERIENCE = re.compile(r"^experience/([^/]+)/(?:[^/]+/)?([^/]+)/(\d{16})-(\d{16})\.cbx$")
_ROOT = re.compile(r"^trust/roots/(\d+)\.json$")
_SIGNING_REQUEST = re.compile(r"^signing/requests/(\d+)\.json$")


def experience_batch(fleet: str, device: str, first: int, last: int) -> str:
    """Where the records ``first..last`` of a device are stored: from the records' identity only."""
    return f"{EXPERIENCE_PREFIX}{fleet}/{device}/{first:016d}-{last:016d}.cbx"


def experience_prefix(fleet: str | None = None, device: str | None = None) -> str:
    if fleet is None:
        return EXPERIENCE_PREFIX
    return f"{EXPERIENCE_PREFIX}{fleet}/" if device is None else f"{EXPERIENCE_PREFIX}{fleet}/{device}/"


def parse_experience_key(key: str) -> tuple[str, str, int, int] | None:
    """``(fleet, device, first, last)`` of an experience key, or None if ``key`` is not one."""
    m = _EXPERIENCE.match(key)
    return (m[1], m[2], int(m[3]), int(m[4])) if m else None


def release_bundle(counter: int) -> str:
    return f"{RELEASES_PREFIX}{counter}/model.safetensors"


def release_manifest(counter: int) -> str:
    return f"{RELEASES_PREFIX}{counter}/manifest.json"


def release_rollback(counter: int) -> str:
    return f"{RELEASES_PREFIX}{counter}/rollback.json"


def registry_record(counter: int) -> str:
    return f"{REGISTRY_PREFIX}{counter:08d}.json"


def audit_entry(day: str, time_ns: int, n: int) -> str:
    return f"{AUDIT_PREFIX}{day}/{time_ns:020d}-{n:06d}.json"


def root(version: int) -> str:
    return f"{ROOTS_PREFIX}{version}.json"


def root_version(key: str) -> int | None:
    m = _ROOT.match(key)
    return int(m[1]) if m else None


def signing_request(counter: int) -> str:
    return f"{SIGNING_REQUESTS_PREFIX}{counter}.json"


def signing_request_counter(key: str) -> int | None:
    m = _SIGNING_REQUEST.match(key)
    return int(m[1]) if m else None


def signing_bundle(counter: int) -> str:
    return f"signing/bundles/{counter}.safetensors"


def signing_done(counter: int) -> str:
    return f"signing/done/{counter}.json"


def loop_init(name: str) -> str:
    return f"loop/{name}/init.safetensors"


def loop_prefix(name: str, stage: str) -> str:
    """Where a round's training ``stage`` (``vtrace``, ``ppo``) writes its outputs."""
    return f"loop/{name}/{stage}"


def loop_model(name: str, stage: str = "ppo") -> str:
    return f"{loop_prefix(name, stage)}/model.safetensors"
