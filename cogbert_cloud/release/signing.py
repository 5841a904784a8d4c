"""Release keys and signed release manifests: the owner's side of ``cogbert_edge.update.trust``.

    cogbert keys init DIR            root key, release key, root.json (version 1)
    cogbert keys rotate DIR [--root] new release key (and root key): root.json version N+1,
                                     signed by the old and the new root keys
    cogbert release create --bundle FILE --keys DIR --counter N --out DIR [--expires 30d]
    cogbert release verify --trust root.json --manifest FILE --bundle FILE

Layout of a keys directory:

    DIR/root.json              the current root (give it to devices; ``roots/N.json`` the chain)
    DIR/roots/N.json           every root version, so a device can walk from its version to now
    DIR/private/root-key.pem   offline root key (0600): keep it off every server
    DIR/private/release-key.pem  the current release-signing key (0600)

The rollout service never needs this directory: it distributes manifests that were signed
here, and chooses which device gets which (docs/security.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cogbert_edge import __version__
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge.errors import CogbertError
from cogbert_edge.inference.bundle import FORMAT_VERSION, load_bundle
from cogbert_edge.inference.model import ARCHITECTURE
from cogbert_edge.update.trust import (
    Release,
    TrustedState,
    VerificationError,
    format_time,
    key_id,
    sign,
)

__all__ = ["KeyStore", "create_release", "create_site_release", "parse_duration"]


class KeyStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.private = self.root / "private"

    @classmethod
    def init(cls, root: Path, *, expires_days: int = 365) -> KeyStore:
        ks = cls(root)
        if (ks.root / "root.json").exists():
            raise CogbertError(f"{root} already holds keys; use `cogbert keys rotate`")
        ks.private.mkdir(parents=True, exist_ok=True)
        ks.private.chmod(0o700)
        root_key, release_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        ks._write_key("root-key.pem", root_key)
        ks._write_key("release-key.pem", release_key)
        ks._publish_root(1, root_key, release_key, signers=[root_key], expires_days=expires_days)
        return ks

    def rotate(self, *, root: bool = False, expires_days: int = 365) -> int:
        """A new release key (and root key with ``root``); returns the new root version."""
        old_root = self.key("root-key.pem")
        version = json.loads(self.root_bytes())["signed"]["version"] + 1
        new_root = Ed25519PrivateKey.generate() if root else old_root
        release_key = Ed25519PrivateKey.generate()
        signers = [old_root] if new_root is old_root else [old_root, new_root]
        self._publish_root(version, new_root, release_key, signers=signers, expires_days=expires_days)
        self._write_key("root-key.pem", new_root)
        self._write_key("release-key.pem", release_key)
        return version

    def root_bytes(self) -> bytes:
        return (self.root / "root.json").read_bytes()

    def root_chain(self, after: int = 1) -> list[bytes]:
        """Root versions after ``after``, oldest first (what a device at ``after`` must walk)."""
        out = []
        for p in sorted((self.root / "roots").glob("*.json"), key=lambda p: int(p.stem)):
            if int(p.stem) > after:
                out.append(p.read_bytes())
        return out

    def key(self, name: str) -> Ed25519PrivateKey:
        try:
            k = serialization.load_pem_private_key((self.private / name).read_bytes(), password=None)
        except FileNotFoundError:
            raise CogbertError(f"no {name} in {self.private} (is this a keys directory?)") from None
        assert isinstance(k, Ed25519PrivateKey)
        return k

    def _publish_root(self, version: int, root_key: Ed25519PrivateKey, release_key: Ed25519PrivateKey, *,
                      signers: list[Ed25519PrivateKey], expires_days: int) -> None:
        keys = {}
        for k in (root_key, release_key):
            raw = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            keys[key_id(k.public_key())] = {"keytype": "ed25519", "public": raw.hex()}
        signed = {"_type": "root", "version": version,
                  "expires": format_time(_now() + dt.timedelta(days=expires_days)), "keys": keys,
                  "roles": {"root": {"keyids": [key_id(root_key.public_key())], "threshold": 1},
                            "release": {"keyids": [key_id(release_key.public_key())], "threshold": 1}}}
        data = json.dumps(sign(signed, signers), indent=1).encode()
        (self.root / "roots").mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "roots" / f"{version}.json", data)
        atomic_write(self.root / "root.json", data)

    def _write_key(self, name: str, key: Ed25519PrivateKey) -> None:
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        atomic_write(self.private / name, pem, mode=0o600)


def parse_duration(s: str) -> dt.timedelta:
    m = re.match(r"^(\d+)([smhd])$", s)
    if not m:
        raise CogbertError(f"duration {s!r} must look like 30d, 12h, 45m or 90s")
    return dt.timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m[2]]: int(m[1])})


def create_release(bundle_bytes: bytes, keys: KeyStore, *, counter: int, model: str, fleet: str,
                   expires: dt.timedelta = dt.timedelta(days=30), min_sdk: str = __version__,
                   created: dt.datetime | None = None) -> bytes:
    """A signed release manifest for ``bundle_bytes`` (which must be a valid bundle)."""
    if counter < 1:
        raise CogbertError("the release counter must be a positive integer")
    b = load_bundle(bundle_bytes)
    created = created or _now()
    signed = {"_type": "release", "model": model, "fleet": fleet, "counter": counter,
              "bundle": {"sha256": hashlib.sha256(bundle_bytes).hexdigest(), "length": len(bundle_bytes)},
              "compat": {"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
                         "obs_dim": b.config.obs_dim, "hidden": b.config.hidden,
                         "action": {"kind": b.config.action.kind, "size": b.config.action.size},
                         "min_sdk": min_sdk},
              "created": format_time(created), "expires": format_time(created + expires)}
    return json.dumps(sign(signed, [keys.key("release-key.pem")]), indent=1).encode()


def create_site_release(role_bundles: dict[str, bytes], keys: KeyStore, *, counter: int, model: str, fleet: str,
                        expires: dt.timedelta = dt.timedelta(days=30), min_sdk: str = __version__,
                        created: dt.datetime | None = None) -> bytes:
    """One signed manifest for the bundles of every role of a multi-agent site (``docs/multi-agent.md``).

    A site's agents verify it with ``TrustedState.verify_site_release`` and each installs its own
    role's bundle, so no site ever runs bundles that were not released together; a rollback is
    another site release (a higher counter, the previous bundles)."""
    if counter < 1:
        raise CogbertError("the release counter must be a positive integer")
    if not role_bundles:
        raise CogbertError("a site release needs at least one role bundle")
    created = created or _now()
    roles = {}
    for role, data in sorted(role_bundles.items()):
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", role):
            raise CogbertError(f"invalid role name {role!r}")
        b = load_bundle(data)
        roles[role] = {"bundle": {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)},
                       "compat": {"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE,
                                  "obs_dim": b.config.obs_dim, "hidden": b.config.hidden,
                                  "action": {"kind": b.config.action.kind, "size": b.config.action.size},
                                  "min_sdk": min_sdk}}
    signed = {"_type": "site-release", "model": model, "fleet": fleet, "counter": counter, "roles": roles,
              "created": format_time(created), "expires": format_time(created + expires)}
    return json.dumps(sign(signed, [keys.key("release-key.pem")]), indent=1).encode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``keys`` and ``release``; returns the ``release`` group (the signer joins it)."""
    keys = sub.add_parser("keys", help="root and release-signing keys")
    ksub = keys.add_subparsers(dest="keys_cmd", required=True)
    p = ksub.add_parser("init", help="create a root key, a release key and root.json version 1")
    p.add_argument("dir", type=Path)
    p.add_argument("--expires-days", type=int, default=365)
    p.set_defaults(func=lambda a: _say(f"wrote {KeyStore.init(a.dir, expires_days=a.expires_days).root / 'root.json'}"))
    p = ksub.add_parser("rotate", help="new release key (and root key with --root): root.json version N+1")
    p.add_argument("dir", type=Path)
    p.add_argument("--root", action="store_true", help="also replace the root key")
    p.add_argument("--expires-days", type=int, default=365)
    p.set_defaults(func=lambda a: _say(
        f"root version {KeyStore(a.dir).rotate(root=a.root, expires_days=a.expires_days)}"))

    rel = sub.add_parser("release", help="signed release manifests")
    rsub = rel.add_subparsers(dest="release_cmd", required=True)
    p = rsub.add_parser("create", help="sign a release manifest for a bundle")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--counter", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expires", default="30d")
    p.add_argument("--model", default="cogbert")
    p.add_argument("--fleet", default="default")
    p.add_argument("--min-sdk", default=__version__)

    def create(a: argparse.Namespace) -> int:
        data = a.bundle.read_bytes()
        manifest = create_release(data, KeyStore(a.keys), counter=a.counter, model=a.model, fleet=a.fleet,
                                  expires=parse_duration(a.expires), min_sdk=a.min_sdk)
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"release-{a.counter}.json"
        atomic_write(path, manifest)
        return _say(f"wrote {path} (bundle sha256 {hashlib.sha256(data).hexdigest()[:16]}…)")

    p.set_defaults(func=create)
    p = rsub.add_parser("verify", help="check a manifest and bundle against a trusted root (exit 0 if valid)")
    p.add_argument("--trust", type=Path, required=True, help="a trusted root.json")
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--model", default=None, help="expected model (default: the manifest's)")
    p.add_argument("--fleet", default=None, help="expected fleet (default: the manifest's)")
    p.add_argument("--above", type=int, default=0, help="the counter must be above this")

    def verify(a: argparse.Namespace) -> int:
        try:
            rel = _verified(a)
        except VerificationError as e:
            print(f"cogbert: release rejected: {e}", file=sys.stderr)
            return 1
        return _say(f"ok: release {rel.counter} of {rel.model} for fleet {rel.fleet}, bundle {rel.sha256[:16]}…")

    p.set_defaults(func=verify)

    p = rsub.add_parser("register", help="add a signed release to the store's registry (the first stable "
                                         "release of a fleet, or one signed outside the loop)")
    p.add_argument("--store", required=True, help="object store URL of the control plane")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--trust", type=Path, required=True,
                   help="the root.json the devices trust: the release must verify against it")
    p.add_argument("--model", default=None, help="expected model (default: the manifest's)")
    p.add_argument("--fleet", default=None, help="expected fleet (default: the manifest's)")
    p.add_argument("--state", choices=("stable", "candidate"), default="stable")

    def register_release(a: argparse.Namespace) -> int:
        from cogbert_cloud.data.store import open_store
        from cogbert_cloud.release.registry import Registry

        a.above = 0
        try:
            rel = _verified(a)
        except VerificationError as e:
            print(f"cogbert: release not registered: {e}", file=sys.stderr)
            return 1
        registry = Registry(open_store(a.store))
        if a.state == "stable" and (current := registry.stable()) is not None:
            print(f"cogbert: release {current['counter']} is already stable; a new one becomes stable through a "
                  "rollout (register it with --state candidate)", file=sys.stderr)
            return 1
        rec = registry.add(rel.counter, a.bundle.read_bytes(), a.manifest.read_bytes(), state=a.state,
                           actor="operator")
        return _say(json.dumps({k: rec[k] for k in ("counter", "model_id", "sha256", "state")}))

    p.set_defaults(func=register_release)
    return rsub


def _verified(a: argparse.Namespace) -> Release:
    """The release of ``a.manifest`` and ``a.bundle``, checked as a device would against
    ``a.trust``; raises :class:`VerificationError`."""
    manifest = a.manifest.read_bytes()
    try:
        signed = json.loads(manifest).get("signed", {})
    except ValueError:
        signed = {}
    ts = TrustedState(a.trust.read_bytes(), now=_now())
    rel = ts.verify_release(manifest, model=a.model or str(signed.get("model")),
                            fleet=a.fleet or str(signed.get("fleet")), highest_counter=a.above,
                            sdk_format_version=FORMAT_VERSION,
                            sdk_version=tuple(int(x) for x in __version__.split(".")))
    TrustedState.verify_bundle(rel, a.bundle.read_bytes())
    load_bundle(a.bundle.read_bytes())
    return rel


def _say(msg: str) -> int:
    print(msg)
    return 0
