"""Which models a device may run: TUF-style signed metadata, verified without any I/O.

Two kinds of signed documents, each ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``
with Ed25519 signatures over the canonical JSON of ``signed``:

- ``root`` (version N, expiry): the keys, and which of them may sign the next root and which
  may sign releases, each with a threshold. An offline root key signs it. Root N+1 must be
  signed by a threshold of root N's root keys *and* of its own; a device walks the chain one
  version at a time, so a skipped version is rejected, and a key that root N+1 no longer lists
  stops being accepted.
- ``release``: model name, fleet, a monotonic release counter, the bundle's sha256 and length,
  compatibility (bundle format version, architecture, observation and action shapes, minimum
  SDK version), created and expiry times. Release keys sign it.

:class:`TrustedState` is the pure verifier, in the manner of python-tuf's trusted metadata
set: bytes in, a verified object or a :class:`VerificationError` out, no files, no clocks
except the ``now`` it is given. The update agent wraps it with I/O and persistence.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cogbert_edge.errors import VerificationError

__all__ = ["TrustedState", "Release", "VerificationError", "canonical", "key_id", "sign", "parse_time",
           "format_time", "MAX_METADATA_BYTES"]

MAX_METADATA_BYTES = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8; floats are not allowed."""
    def check(o: Any) -> None:
        if isinstance(o, float):
            raise VerificationError("malformed", "signed metadata may not contain floats")
        if isinstance(o, dict):
            for v in o.values():
                check(v)
        elif isinstance(o, list):
            for v in o:
                check(v)
    check(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(signed: dict, keys: list[Ed25519PrivateKey]) -> dict:
    """The envelope ``{"signed", "signatures"}`` for ``signed``, signed by every key."""
    msg = canonical(signed)
    return {"signed": signed,
            "signatures": [{"keyid": key_id(k.public_key()), "sig": k.sign(msg).hex()} for k in keys]}


def parse_time(s: Any) -> dt.datetime:
    if not isinstance(s, str) or not _TIME.match(s):
        raise VerificationError("malformed", f"time {str(s)[:40]!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)


def format_time(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Release:
    """A verified release manifest."""

    model: str
    fleet: str
    counter: int
    sha256: str
    length: int
    compat: dict
    created: str
    expires: str
    raw: bytes            # the manifest bytes as verified (kept for status and re-verification)

    @property
    def expires_at(self) -> dt.datetime:
        return parse_time(self.expires)


def _load(data: bytes, what: str) -> tuple[dict, list]:
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_METADATA_BYTES:
        raise VerificationError("malformed", f"{what} is not bytes of at most {MAX_METADATA_BYTES}")
    try:
        env = json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise VerificationError("malformed", f"{what} is not JSON: {str(e)[:80]}") from None
    if not isinstance(env, dict) or set(env) != {"signed", "signatures"}:
        raise VerificationError("malformed", f"{what} must be {{signed, signatures}}")
    signed, sigs = env["signed"], env["signatures"]
    if not isinstance(signed, dict) or not isinstance(sigs, list) or len(sigs) > 16:
        raise VerificationError("malformed", f"{what} has a bad envelope")
    return signed, sigs


def _reject_constant(name: str) -> Any:
    raise ValueError(f"constant {name}")


def _no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _count_valid(signed: dict, sigs: list, keys: dict[str, Ed25519PublicKey], allowed: list[str]) -> int:
    """Distinct allowed keys with a valid signature over ``signed``."""
    msg = canonical(signed)
    good: set[str] = set()
    for s in sigs:
        if not isinstance(s, dict) or set(s) != {"keyid", "sig"}:
            raise VerificationError("malformed", "a signature must be {keyid, sig}")
        kid, sig = s["keyid"], s["sig"]
        if kid not in allowed or kid not in keys or kid in good or not isinstance(sig, str):
            continue
        try:
            keys[kid].verify(bytes.fromhex(sig), msg)
            good.add(kid)
        except (InvalidSignature, ValueError):
            continue
    return len(good)


@dataclass(frozen=True)
class _Root:
    version: int
    expires: dt.datetime
    keys: dict[str, Ed25519PublicKey]
    roles: dict[str, tuple[list[str], int]]


def _parse_root(signed: dict) -> _Root:
    if set(signed) != {"_type", "version", "expires", "keys", "roles"} or signed["_type"] != "root":
        raise VerificationError("malformed", "root must have _type root, version, expires, keys, roles")
    version = signed["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise VerificationError("malformed", "root version must be a positive integer")
    keys: dict[str, Ed25519PublicKey] = {}
    if not isinstance(signed["keys"], dict):
        raise VerificationError("malformed", "root keys must be an object")
    for kid, k in signed["keys"].items():
        if (not isinstance(k, dict) or set(k) != {"keytype", "public"} or k["keytype"] != "ed25519"
                or not isinstance(k["public"], str) or not _HEX64.match(k["public"])):
            raise VerificationError("malformed", f"key {str(kid)[:16]} must be an ed25519 public key in hex")
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(k["public"]))
        if key_id(pub) != kid:
            raise VerificationError("malformed", f"key id {str(kid)[:16]} does not match its key")
        keys[kid] = pub
    roles: dict[str, tuple[list[str], int]] = {}
    if not isinstance(signed["roles"], dict) or set(signed["roles"]) != {"root", "release"}:
        raise VerificationError("malformed", "root roles must be exactly root and release")
    for name, r in signed["roles"].items():
        if (not isinstance(r, dict) or set(r) != {"keyids", "threshold"} or not isinstance(r["keyids"], list)
                or not all(k in keys for k in r["keyids"]) or isinstance(r["threshold"], bool)
                or not isinstance(r["threshold"], int) or not 1 <= r["threshold"] <= len(r["keyids"])):
            raise VerificationError("malformed", f"role {name} needs listed keyids and 1 <= threshold <= their count")
        roles[name] = (list(r["keyids"]), r["threshold"])
    return _Root(version, parse_time(signed["expires"]), keys, roles)


class TrustedState:
    """The device's trusted root, and the checks every update must pass."""

    def __init__(self, root: bytes, *, now: dt.datetime) -> None:
        """Trust ``root`` (shipped with the device, or persisted from an earlier update). It
        must be signed by its own root role's threshold; it may have expired (a device offline
        for long must still be able to walk forward), but then no release verifies."""
        signed, sigs = _load(root, "root")
        r = _parse_root(signed)
        keyids, threshold = r.roles["root"]
        if _count_valid(signed, sigs, r.keys, keyids) < threshold:
            raise VerificationError("bad_signature", "the trusted root is not signed by its own root keys")
        self.root = r
        self.root_bytes = bytes(root)
        self.now = now

    @property
    def version(self) -> int:
        return self.root.version

    def update_root(self, new: bytes) -> None:
        """Accept root version N+1: signed by a threshold of the current root keys and of its
        own. Skipped or repeated versions are rejected."""
        signed, sigs = _load(new, "root")
        r = _parse_root(signed)
        if r.version != self.root.version + 1:
            raise VerificationError("version", f"root version {r.version} does not follow {self.root.version}")
        old_ids, old_t = self.root.roles["root"]
        if _count_valid(signed, sigs, self.root.keys, old_ids) < old_t:
            raise VerificationError("bad_signature", f"root {r.version} lacks signatures of root {self.root.version}")
        new_ids, new_t = r.roles["root"]
        if _count_valid(signed, sigs, r.keys, new_ids) < new_t:
            raise VerificationError("bad_signature", f"root {r.version} lacks signatures of its own root keys")
        self.root, self.root_bytes = r, bytes(new)

    def update_root_chain(self, roots: list) -> int:
        """Walk ``roots`` (root metadata bytes, oldest first), skipping versions already
        trusted; returns how many were accepted."""
        accepted = 0
        for root in roots:
            signed, _ = _load(root, "root")
            version = signed.get("version")
            if isinstance(version, int) and not isinstance(version, bool) and version <= self.root.version:
                continue
            self.update_root(root)
            accepted += 1
        return accepted

    def verify_release(self, manifest: bytes, *, model: str, fleet: str, highest_counter: int,
                       sdk_format_version: int, sdk_version: tuple[int, ...]) -> Release:
        """Everything about a release manifest except the bundle's bytes: signatures by the
        current release keys, expiry, model and fleet, the anti-rollback counter (strictly above
        ``highest_counter``), compatibility with this SDK."""
        signed, sigs = _load(manifest, "manifest")
        keys = {"_type", "model", "fleet", "counter", "bundle", "compat", "created", "expires"}
        if set(signed) != keys or signed["_type"] != "release":
            raise VerificationError("malformed", f"a release manifest has exactly {sorted(keys)}")
        self._check_release_signatures(signed, sigs)
        return self._release_fields(signed, manifest, model=model, fleet=fleet, highest_counter=highest_counter,
                                    sdk_format_version=sdk_format_version, sdk_version=sdk_version)

    def verify_site_release(self, manifest: bytes, *, role: str, model: str, fleet: str, highest_counter: int,
                            sdk_format_version: int, sdk_version: tuple[int, ...]) -> Release:
        """A multi-agent site release: the bundles of every role of a site, signed together in one
        manifest (``{"_type": "site-release", ..., "roles": {ROLE: {"bundle", "compat"}}}``), so the
        agents of a site can only install bundles released together. Checked exactly as
        :meth:`verify_release`; returns the release of ``role``'s bundle (its ``manifest`` is the
        whole site manifest)."""
        signed, sigs = _load(manifest, "manifest")
        keys = {"_type", "model", "fleet", "counter", "roles", "created", "expires"}
        if set(signed) != keys or signed["_type"] != "site-release":
            raise VerificationError("malformed", f"a site release manifest has exactly {sorted(keys)}")
        self._check_release_signatures(signed, sigs)
        roles = signed["roles"]
        if not isinstance(roles, dict) or not roles or not all(isinstance(r, str) and _NAME.match(r) for r in roles):
            raise VerificationError("malformed", "roles must map role names to {bundle, compat}")
        entry = roles.get(role)
        if entry is None:
            raise VerificationError("mismatch", f"the site release has no bundle for role {role!r} "
                                                f"(it has {sorted(roles)})")
        if not isinstance(entry, dict) or set(entry) != {"bundle", "compat"}:
            raise VerificationError("malformed", "a role's entry has exactly bundle and compat")
        view = {k: v for k, v in signed.items() if k != "roles"}
        view.update(_type="release", bundle=entry["bundle"], compat=entry["compat"])
        return self._release_fields(view, manifest, model=model, fleet=fleet, highest_counter=highest_counter,
                                    sdk_format_version=sdk_format_version, sdk_version=sdk_version)

    def _check_release_signatures(self, signed: dict, sigs: list) -> None:
        ids, threshold = self.root.roles["release"]
        listed = [s.get("keyid") for s in sigs if isinstance(s, dict)]
        if not any(k in ids for k in listed):
            raise VerificationError("unknown_key", "no signature is by a current release key "
                                                   f"(root version {self.root.version})")
        if _count_valid(signed, sigs, self.root.keys, ids) < threshold:
            raise VerificationError("bad_signature", "the release signatures do not verify")
        if self.now >= self.root.expires:
            raise VerificationError("expired", f"the trusted root (version {self.root.version}) has expired")

    def _release_fields(self, signed: dict, manifest: bytes, *, model: str, fleet: str, highest_counter: int,
                        sdk_format_version: int, sdk_version: tuple[int, ...]) -> Release:
        counter = signed["counter"]
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 1:
            raise VerificationError("malformed", "counter must be a positive integer")
        b = signed["bundle"]
        if (not isinstance(b, dict) or set(b) != {"sha256", "length"} or not isinstance(b["sha256"], str)
                or not _HEX64.match(b["sha256"]) or isinstance(b["length"], bool) or not isinstance(b["length"], int)
                or not 0 < b["length"] <= 1 << 30):
            raise VerificationError("malformed", "bundle must be {sha256: 64 hex, length: 1..2^30}")
        for k in ("model", "fleet"):
            if not isinstance(signed[k], str) or not _NAME.match(signed[k]):
                raise VerificationError("malformed", f"{k} must be a short name")
        created, expires = parse_time(signed["created"]), parse_time(signed["expires"])
        if signed["model"] != model or signed["fleet"] != fleet:
            raise VerificationError("mismatch", f"release is for model {signed['model']!r} in fleet "
                                                f"{signed['fleet']!r}; this device runs {model!r} in {fleet!r}")
        if self.now >= expires:
            raise VerificationError("expired", f"release {counter} expired at {signed['expires']}")
        if counter <= highest_counter:
            raise VerificationError("rollback", f"release counter {counter} is not above {highest_counter}, "
                                                "the highest this device accepted")
        compat = signed["compat"]
        ck = {"format_version", "architecture", "obs_dim", "action", "hidden", "min_sdk"}
        if not isinstance(compat, dict) or set(compat) != ck:
            raise VerificationError("malformed", f"compat must have exactly {sorted(ck)}")
        if compat["format_version"] != sdk_format_version:
            raise VerificationError("incompatible", f"bundle format {compat['format_version']} is not "
                                                    f"{sdk_format_version}, the one this SDK reads")
        min_sdk = compat["min_sdk"]
        if not isinstance(min_sdk, str) or not re.match(r"^\d+(\.\d+){0,2}$", min_sdk):
            raise VerificationError("malformed", "min_sdk must be a version like 0.1.0")
        if tuple(int(x) for x in min_sdk.split(".")) > sdk_version:
            raise VerificationError("incompatible", f"needs SDK >= {min_sdk}")
        if created > expires:
            raise VerificationError("malformed", "created after it expires")
        return Release(signed["model"], signed["fleet"], counter, b["sha256"], b["length"], compat,
                       signed["created"], signed["expires"], bytes(manifest))

    @staticmethod
    def verify_bundle(release: Release, data: bytes) -> None:
        """The bundle bytes are exactly the ones the release names."""
        if len(data) != release.length:
            raise VerificationError("length_mismatch",
                                    f"bundle is {len(data)} bytes; the release says {release.length}")
        if hashlib.sha256(data).hexdigest() != release.sha256:
            raise VerificationError("hash_mismatch", "bundle sha256 differs from the release's")
