"""The fleet PKI: one CA that issues the broker's, the devices' and the services' certificates.

Layout of a PKI directory (scripts may rely on it):

    DIR/ca.pem                      the fleet CA: issues the broker's and the devices' certificates
                                    (give it to every device and service: it verifies the broker)
    DIR/crl.pem                     the fleet CA's certificate revocation list
    DIR/services-ca.pem             the services CA: issues the cloud services' certificates
    DIR/services-crl.pem            its revocation list
    DIR/revoked.txt                 names of revoked identities, one a line (for the broker plugin)
    DIR/private/ca-key.pem          CA private keys (0600, in a 0700 directory; keep offline)
    DIR/private/services-ca-key.pem
    DIR/server/{cert,key}.pem       the broker's identity
    DIR/devices/ID/{cert,key}.pem   device ID (CN = ID, OU = its fleet); no key.pem when issued from a CSR
    DIR/services/NAME/{cert,key}.pem  cloud service NAME (CN = svc:NAME)
    DIR/index.json                  every certificate issued: serial, kind, name, fleet, expiry, revocation

Two CAs keep the roles apart: the broker's device listener trusts only the fleet CA and its
service listener only the services CA, so a device certificate cannot even complete a handshake
with the service listener, nor a service certificate with the device listener. A device's fleet
is part of its identity: the broker lets a device use only its own fleet's topics, and learns the
fleet from the certificate's OU (docs/security.md).

Keys are ECDSA P-256 (a faster TLS handshake than RSA on devices) and are created 0600 from
the start: the temporary file they are written to is private before any byte lands in it.
Nothing secret is ever logged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cogbert_cloud.errors import PKIError
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError
from cogbert_edge.wire.topics import check_device_id, check_fleet

__all__ = ["PKI", "Identity", "SERVICE_PREFIX", "service_username"]

log = logging.getLogger("cogbert.pki")
SERVICE_PREFIX = "svc:"  # device ids cannot contain ':', so no device can pose as a service
CRL_DAYS = 30


def service_username(name: str) -> str:
    """The MQTT username (certificate CN) of cloud service ``name``."""
    return SERVICE_PREFIX + check_device_id(name)


@dataclass(frozen=True)
class Identity:
    """Where an issued identity's files are. ``key`` is None when the holder kept its key."""

    name: str
    cert: Path
    key: Path | None
    serial: int


class PKI:
    """A fleet PKI directory. Create one with :meth:`init`, open it with :meth:`open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ca_cert_path = self.root / "ca.pem"
        self.crl_path = self.root / "crl.pem"
        self.revoked_path = self.root / "revoked.txt"
        self.services_ca_path = self.root / "services-ca.pem"
        self.services_crl_path = self.root / "services-crl.pem"
        self._ca_key_path = self.root / "private" / "ca-key.pem"
        self._services_key_path = self.root / "private" / "services-ca-key.pem"
        self._index_path = self.root / "index.json"

    # -- creating and opening ---------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, *, common_name: str = "Cogbert fleet CA", days: int = 3650) -> PKI:
        pki = cls(root)
        if pki.ca_cert_path.exists():
            raise PKIError(f"{root} already holds a PKI (ca.pem exists); refusing to overwrite it")
        pki.root.mkdir(parents=True, exist_ok=True)
        (pki.root / "private").mkdir(mode=0o700, exist_ok=True)
        os.chmod(pki.root / "private", 0o700)
        cert = _make_ca(pki.ca_cert_path, pki._ca_key_path, common_name, days)
        _make_ca(pki.services_ca_path, pki._services_key_path, f"{common_name} (services)", days)
        pki._save_index([])
        pki.refresh_crl()
        event(log, "pki_initialised", root=str(root), ca_serial=str(cert.serial_number))
        return pki

    def services_ca(self) -> tuple[Path, Path]:
        """The services CA's certificate and CRL (for the broker's service listener)."""
        if not self.services_ca_path.exists():
            raise PKIError(f"{self.root} has no services CA (services-ca.pem): it was made by an older "
                           f"Cogbert. Run `cogbert pki init-services {self.root}`, then re-issue every service "
                           "identity (cogbert pki issue-service)")
        return self.services_ca_path, self.services_crl_path

    def init_services(self, *, days: int = 3650) -> Path:
        """Add the services CA to a PKI made before services had their own (then re-issue the
        service identities: certificates of the fleet CA no longer reach the service listener)."""
        if self.services_ca_path.exists():
            raise PKIError(f"{self.root} already has a services CA")
        ca = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        # A common name is a string (cryptography types attribute values str | bytes for the few
        # binary attribute types).
        name = str(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        self._ca()   # needs the fleet CA's key: this is the CA's machine
        _make_ca(self.services_ca_path, self._services_key_path, f"{name} (services)", days)
        self.refresh_crl()
        return self.services_ca_path

    @classmethod
    def open(cls, root: Path, *, with_ca_key: bool = True) -> PKI:
        """Open a PKI directory. ``with_ca_key=False`` is for readers (the broker's
        configuration): they need the CA certificate, the CRL and the index, never the key, so
        they work on a copy without ``private/``; issuing or revoking there fails clearly."""
        pki = cls(root)
        if not pki.ca_cert_path.exists() or (with_ca_key and not pki._ca_key_path.exists()):
            raise PKIError(f"{root} is not a PKI directory (run `cogbert pki init {root}` first)")
        return pki

    # -- issuing ----------------------------------------------------------------------------

    def issue_server(self, hosts: list[str], *, days: int = 825) -> Identity:
        """The broker's certificate, valid for every DNS name or IP address in ``hosts``."""
        if not hosts:
            raise ConfigError("a server certificate needs at least one --host")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        return self._issue("server", hosts[0], self.root / "server", ExtendedKeyUsageOID.SERVER_AUTH,
                           days=days, sans=sans)

    def issue_device(self, device_id: str, *, fleet: str = "default", days: int = 365,
                     not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
                     site: str | None = None, site_role: str = "agent", tags: list[str] | None = None) -> Identity:
        """Device ``device_id`` of ``fleet``: the certificate's CN is the id, its OU the fleet.
        ``tags`` go into the index only (not the certificate: they change; ``fleet/tags.py``).

        A member of a multi-agent site also carries its site (subject L) and its site role
        (subject title: ``agent`` or ``coordinator``), which the broker's site ACLs read."""
        check_device_id(device_id)
        site_entries = None
        if site is not None:
            from cogbert_edge.wire.topics import SITE_ROLES, check_site
            if site_role not in SITE_ROLES:
                raise PKIError(f"site_role must be one of {SITE_ROLES}, got {site_role!r}")
            site_entries = (check_site(site), site_role)
        from cogbert_cloud.fleet.tags import check_tags
        try:
            clean = check_tags(tags or [])
        except ConfigError as e:
            raise PKIError(str(e)) from None
        ident = self._issue("device", device_id, self.root / "devices" / device_id,
                            ExtendedKeyUsageOID.CLIENT_AUTH, days=days, not_before=not_before,
                            not_after=not_after, fleet=check_fleet(fleet), site=site_entries)
        if clean:
            index = self._load_index()
            for entry in index:
                if entry["serial"] == ident.serial:
                    entry["tags"] = clean
            self._save_index(index)
        return ident

    def issue_service(self, name: str, *, days: int = 365) -> Identity:
        return self._issue("service", service_username(name), self.root / "services" / name,
                           ExtendedKeyUsageOID.CLIENT_AUTH, days=days)

    def sign_csr(self, csr_pem: bytes, *, fleet: str = "default", days: int = 365) -> Identity:
        """Issue a device certificate of ``fleet`` for a key the device generated and kept.

        The CN of the request must be a valid device id; every other requested attribute or
        extension is ignored (the CA decides what a device certificate contains, its fleet
        included).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise PKIError(f"not a PEM certificate signing request: {e}") from None
        if not csr.is_signature_valid:
            raise PKIError("the CSR's signature does not match its public key")
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(cns) != 1:
            raise PKIError("the CSR must name exactly one common name (the device id)")
        device_id = check_device_id(str(cns[0].value))
        return self._issue("device", device_id, self.root / "devices" / device_id,
                           ExtendedKeyUsageOID.CLIENT_AUTH, days=days, public_key=csr.public_key(),
                           fleet=check_fleet(fleet))

    def revoke(self, name: str, *, kind: str | None = None, serial: int | None = None) -> list[int]:
        """Revoke every unrevoked certificate issued to ``name`` (or only the one with
        ``serial``: the old certificate after a rotation, while the new one stays valid) and
        publish a new CRL.

        ``kind`` (device, service or server) is needed only when a device and a service share
        the name. Returns the serials revoked. Brokers see the new CRL on reload (SIGHUP).
        """
        index = self._load_index()
        names = {"device": name, "service": SERVICE_PREFIX + name, "server": name}
        matches = [e for e in index if (kind is None or e["kind"] == kind)
                   and e["name"] == names[e["kind"]] and e["revoked_at"] is None
                   and (serial is None or int(e["serial"]) == serial)]
        kinds = {e["kind"] for e in matches}
        if not matches:
            which = f" with serial {serial}" if serial is not None else ""
            raise PKIError(f"no unrevoked certificate{which} is issued to {name!r} (see `cogbert pki list`)")
        if len(kinds) > 1:
            raise PKIError(f"{name!r} names a {' and a '.join(sorted(kinds))}; say which with --kind")
        stamp = _now().isoformat()
        for e in matches:
            e["revoked_at"] = stamp
        self._save_index(index)
        self.refresh_crl()
        serials = [e["serial"] for e in matches]
        event(log, "certificate_revoked", name=name, kind=matches[0]["kind"], serials=[str(s) for s in serials])
        return serials

    def refresh_crl(self, *, days: int = CRL_DAYS) -> None:
        """Re-sign both CRLs. Run this well before ``next_update`` (``days`` from now): once a
        CRL is past it, Mosquitto lets no client of that CA connect at all."""
        index = self._load_index()
        for services, path in ((False, self.crl_path), (True, self.services_crl_path)):
            if services and not self.services_ca_path.exists():
                continue
            ca_cert, ca_key = self._ca(services=services)
            now = _now()
            builder = (x509.CertificateRevocationListBuilder()
                       .issuer_name(ca_cert.subject)
                       .last_update(now - dt.timedelta(minutes=5))
                       .next_update(now + dt.timedelta(days=days)))
            for e in index:
                # Entries of a PKI made before the services CA: service certificates of the fleet CA.
                by_services_ca = e.get("ca") == "services"
                if e["revoked_at"] and by_services_ca == services:
                    builder = builder.add_revoked_certificate(
                        x509.RevokedCertificateBuilder().serial_number(e["serial"])
                        .revocation_date(dt.datetime.fromisoformat(e["revoked_at"])).build())
            crl = builder.sign(ca_key, hashes.SHA256())
            atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))

    def certificates(self) -> list[dict]:
        """The index: one entry per certificate issued."""
        return self._load_index()

    def device_identity(self, device_id: str) -> Identity:
        d = self.root / "devices" / check_device_id(device_id)
        return self._existing(device_id, d)

    def service_identity(self, name: str) -> Identity:
        return self._existing(name, self.root / "services" / name)

    # -- internals --------------------------------------------------------------------------

    def _existing(self, name: str, d: Path) -> Identity:
        cert = d / "cert.pem"
        if not cert.exists():
            raise PKIError(f"no certificate for {name!r} in {self.root}")
        serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        key = d / "key.pem"
        return Identity(name, cert, key if key.exists() else None, serial)

    def _ca(self, *, services: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert_path, key_path = ((self.services_ca_path, self._services_key_path) if services
                               else (self.ca_cert_path, self._ca_key_path))
        if services and not cert_path.exists():
            self.services_ca()      # raises: says how to add one
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError as e:
            raise PKIError(f"{e.filename} is missing: issuing and revoking need the CA's private key "
                           "(run this where the PKI's private/ directory is)") from None
        return cert, key  # type: ignore[return-value]

    def _issue(self, kind: str, cn: str, directory: Path, eku: x509.ObjectIdentifier, *, days: int,
               sans: list[x509.GeneralName] | None = None, public_key=None,
               not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
               fleet: str | None = None, site: tuple[str, str] | None = None) -> Identity:
        ca_cert, ca_key = self._ca(services=kind == "service")
        key = None
        if public_key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public_key = key.public_key()
        now = _now()
        not_before = not_before or now - dt.timedelta(minutes=5)
        not_after = not_after or now + dt.timedelta(days=days)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if fleet is not None:
            subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet))
        if site is not None:
            subject += [x509.NameAttribute(NameOID.LOCALITY_NAME, site[0]), x509.NameAttribute(NameOID.TITLE, site[1])]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name(subject))
                   .issuer_name(ca_cert.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        directory.mkdir(parents=True, exist_ok=True)
        if key is not None:
            _write_key(directory / "key.pem", key)
        elif (directory / "key.pem").exists():
            # A key the CA made earlier no longer matches the certificate: remove it.
            (directory / "key.pem").unlink()
        atomic_write(directory / "cert.pem", cert.public_bytes(serialization.Encoding.PEM))
        index = self._load_index()
        entry = {"serial": cert.serial_number, "kind": kind, "name": cn, "not_after": not_after.isoformat(),
                 "revoked_at": None}
        if fleet is not None:
            entry["fleet"] = fleet
        if site is not None:
            entry["site"], entry["site_role"] = site
        if kind == "service":
            entry["ca"] = "services"
        index.append(entry)
        self._save_index(index)
        event(log, "certificate_issued", kind=kind, name=cn, fleet=fleet, serial=str(cert.serial_number),
              not_after=not_after.isoformat())
        return Identity(cn, directory / "cert.pem", directory / "key.pem" if key is not None else None,
                        cert.serial_number)

    def _load_index(self) -> list[dict]:
        try:
            return json.loads(self._index_path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as e:
            raise PKIError(f"{self._index_path} is corrupt: {e}") from None

    def _save_index(self, index: list[dict]) -> None:
        atomic_write(self._index_path, json.dumps(index, indent=1).encode())
        # The broker plugin drops live sessions of these names (the CRL only guards new ones):
        # every name whose certificates are all revoked. A re-issued name is not listed.
        live = {e["name"] for e in index if not e["revoked_at"]}
        names = sorted({e["name"] for e in index if e["revoked_at"]} - live)
        atomic_write(self.revoked_path, "".join(n + "\n" for n in names).encode())


def _make_ca(cert_path: Path, key_path: Path, common_name: str, days: int) -> x509.Certificate:
    """A self-signed CA that issues end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem, mode=0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def register(sub) -> None:
    """``cogbert pki ...``"""
    pki = sub.add_parser("pki", help="the fleet's certificate authority")
    psub = pki.add_subparsers(dest="pki_cmd", required=True)

    def cmd(name: str, helptext: str, func) -> argparse.ArgumentParser:
        p = psub.add_parser(name, help=helptext)
        p.add_argument("dir", type=Path, help="the PKI directory")
        p.set_defaults(func=func)
        return p

    p = cmd("init", "create a fleet CA", lambda a: _say(PKI.init(a.dir, common_name=a.name, days=a.days).ca_cert_path))
    p.add_argument("--name", default="Cogbert fleet CA")
    p.add_argument("--days", type=int, default=3650)
    p = cmd("issue-server", "issue the broker's certificate",
            lambda a: _say(PKI.open(a.dir).issue_server(a.host, days=a.days).cert))
    p.add_argument("--host", action="append", required=True, help="DNS name or IP the broker is reached at")
    p.add_argument("--days", type=int, default=825)
    p = cmd("issue-device", "issue a device identity (CN = device id, OU = its fleet)",
            lambda a: _say(PKI.open(a.dir).issue_device(a.device_id, fleet=a.fleet, days=a.days,
                                                        tags=a.tag).cert))
    p.add_argument("device_id")
    p.add_argument("--tag", action="append", default=[], help="a tag for the device (repeat for more); cloud "
                                                               "serve reads them from index.json")
    p.add_argument("--fleet", default="default", help="the only fleet whose topics the device may use")
    p.add_argument("--days", type=int, default=365)
    p = cmd("sign-csr", "issue a certificate for a device that made its own key",
            lambda a: _say(PKI.open(a.dir).sign_csr(_read(a.csr), fleet=a.fleet, days=a.days).cert))
    p.add_argument("csr", type=Path)
    p.add_argument("--fleet", default="default", help="the only fleet whose topics the device may use")
    p.add_argument("--days", type=int, default=365)
    p = cmd("issue-service", "issue a cloud service identity (CN = svc:NAME; role = NAME up to the first '-')",
            lambda a: _say(PKI.open(a.dir).issue_service(a.name, days=a.days).cert))
    p.add_argument("name")
    p.add_argument("--days", type=int, default=365)
    p = cmd("revoke", "revoke an identity and publish a new CRL (then reload the broker)",
            lambda a: _say(f"revoked serials {PKI.open(a.dir).revoke(a.name, kind=a.kind, serial=a.serial)}"))
    p.add_argument("name")
    p.add_argument("--kind", choices=("device", "service", "server"), default=None)
    p.add_argument("--serial", type=int, default=None,
                   help="only this certificate of the name (e.g. the old one after a rotation)")
    p = cmd("init-services", "add the services CA to a PKI made before services had their own",
            lambda a: _say(PKI.open(a.dir).init_services()))
    p = cmd("crl", "re-sign the CRLs (run well before they expire)", _refresh_crl)
    p.add_argument("--days", type=int, default=CRL_DAYS)
    p = cmd("list", "list issued certificates", lambda a: _say(json.dumps(PKI.open(a.dir).certificates(), indent=1)))


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PKIError(f"cannot read {path}: {e.strerror}") from None


def _refresh_crl(a: argparse.Namespace) -> int:
    pki = PKI.open(a.dir)
    pki.refresh_crl(days=a.days)
    return _say(pki.crl_path)


def _say(what: object) -> int:
    print(what)
    return 0
