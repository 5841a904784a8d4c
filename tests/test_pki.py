"""The fleet PKI and the generated broker configuration (no broker needed here)."""

from __future__ import annotations

import logging
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cogbert_cloud.errors import PKIError
from cogbert_cloud.fleet.broker import BrokerConfig, write_config
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge import ConfigError
from cogbert_edge.link.identity import make_key_and_csr


def cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(c):
    return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.fixture
def pki(tmp_path):
    p = PKI.init(tmp_path / "pki")
    p.issue_server(["localhost", "127.0.0.1"])
    return p


def test_layout_scripts_can_rely_on_with_private_keys_0600(pki):
    dev = pki.issue_device("dev-1")
    svc = pki.issue_service("ingest-0")
    root = pki.root
    for f in ("ca.pem", "crl.pem", "services-ca.pem", "services-crl.pem", "server/cert.pem", "server/key.pem",
              "devices/dev-1/cert.pem", "devices/dev-1/key.pem", "services/ingest-0/cert.pem",
              "services/ingest-0/key.pem"):
        assert (root / f).is_file(), f
    for key in (root / "private/ca-key.pem", root / "private/services-ca-key.pem", root / "server/key.pem",
                dev.key, svc.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE((root / "private").stat().st_mode) == 0o700


def test_certificates_chain_to_the_ca_of_their_role_with_the_right_names_and_usages(pki):
    ca, services_ca = cert(pki.ca_cert_path), cert(pki.services_ca_path)
    server = cert(pki.root / "server/cert.pem")
    device = cert(pki.issue_device("dev-1", fleet="plant").cert)
    service = cert(pki.issue_service("rollout").cert)
    for c, issuer in ((server, ca), (device, ca), (service, services_ca)):
        c.verify_directly_issued_by(issuer)
        assert c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # Roles cannot cross: a service certificate does not chain to the fleet CA, nor a device's
    # to the services CA (the broker's two listeners each trust one of them).
    with pytest.raises(ValueError):
        service.verify_directly_issued_by(ca)
    with pytest.raises(ValueError):
        device.verify_directly_issued_by(services_ca)
    assert cn(device) == "dev-1" and cn(service) == "svc:rollout"
    assert device.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "plant"
    assert [e["fleet"] for e in pki.certificates() if e["kind"] == "device"] == ["plant"]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    eku = lambda c: list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)  # noqa: E731
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert eku(device) == eku(service) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_sign_csr_issues_for_a_device_that_keeps_its_own_key(pki, tmp_path):
    key, csr = make_key_and_csr("dev-7", tmp_path / "device")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ident = pki.sign_csr(csr.read_bytes())
    assert ident.key is None and cn(cert(ident.cert)) == "dev-7"
    assert not (pki.root / "devices/dev-7/key.pem").exists(), "the CA never holds a device's own key"
    with pytest.raises(PKIError, match="not a PEM"):
        pki.sign_csr(b"garbage")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "svc:x", "a.b", "x" * 65, "-lead"])
def test_identities_that_would_break_topics_or_acls_are_refused(pki, bad):
    with pytest.raises(ConfigError):
        pki.issue_device(bad)


def test_revoke_publishes_a_crl_and_the_revoked_list(pki):
    serial = pki.issue_device("dev-1").serial
    pki.issue_device("dev-2")
    assert pki.revoke("dev-1") == [serial]
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    crl.is_signature_valid(cert(pki.ca_cert_path).public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert pki.revoked_path.read_text() == "dev-1\n"
    with pytest.raises(PKIError, match="no unrevoked certificate"):
        pki.revoke("dev-1")
    pki.issue_device("dev-1")          # re-issued: the name may connect again with the new key
    assert pki.revoked_path.read_text() == ""


def test_revoking_one_serial_rotates_a_certificate_cleanly(pki):
    old = pki.issue_service("ingest").serial
    new = pki.issue_service("ingest").serial       # the rotation: both valid for a while
    with pytest.raises(PKIError, match="serial 12345"):
        pki.revoke("ingest", serial=12345)
    assert pki.revoke("ingest", serial=old) == [old]
    crl = x509.load_pem_x509_crl(pki.services_crl_path.read_bytes())
    crl.is_signature_valid(cert(pki.services_ca_path).public_key())
    assert crl.get_revoked_certificate_by_serial_number(old) is not None
    assert crl.get_revoked_certificate_by_serial_number(new) is None
    assert pki.revoked_path.read_text() == "", "the name keeps a valid certificate: no session is dropped"


def test_a_name_shared_by_a_device_and_a_service_needs_a_kind(pki):
    pki.issue_device("ingest")
    pki.issue_service("ingest")
    with pytest.raises(PKIError, match="--kind"):
        pki.revoke("ingest")
    pki.revoke("ingest", kind="service")
    assert pki.revoked_path.read_text() == "svc:ingest\n"


def test_init_refuses_to_overwrite_and_open_refuses_a_non_pki(pki, tmp_path):
    with pytest.raises(PKIError, match="already holds"):
        PKI.init(pki.root)
    with pytest.raises(PKIError, match="not a PKI directory"):
        PKI.open(tmp_path / "elsewhere")


def test_nothing_secret_is_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    p = PKI.init(tmp_path / "p")
    p.issue_server(["localhost"])
    p.issue_device("d")
    keys = [f.read_text() for f in (tmp_path / "p").rglob("*key.pem")]
    assert caplog.records, "issuing should be logged"
    for rec in caplog.records:
        text = rec.getMessage() + str(getattr(rec, "fields", ""))
        assert "PRIVATE KEY" not in text
        assert not any(k.splitlines()[1][:40] in text for k in keys)


def test_broker_config_has_every_security_setting(pki, tmp_path):
    pki.issue_service("ingest-0")
    pki.issue_service("rollout")
    conf = write_config(pki.root, tmp_path / "conf", BrokerConfig(port=18883, autosave_interval=3))
    text = conf.read_text()
    for line in ("tls_version tlsv1.2", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "allow_anonymous false",
                 f"crlfile {pki.crl_path.resolve()}", "persistence true", "autosave_interval 3",
                 "max_packet_size", "max_queued_messages", "listener 18883", "listener 18884",
                 "plugin_opt_revoked_file"):
        assert line in text, line
    assert text.count("require_certificate true") == 2, "both listeners require a client certificate"
    # Each listener trusts the CA of its role only; the identity options are the device listener's.
    device_part, service_part = text.split("listener 18883")[1].split("listener 18884")
    assert f"cafile {pki.ca_cert_path.resolve()}" in device_part and "services-ca" not in device_part
    assert "use_identity_as_username true" in device_part and "use_username_as_clientid true" in device_part
    assert f"cafile {pki.services_ca_path.resolve()}" in service_part
    assert f"crlfile {pki.services_crl_path.resolve()}" in service_part
    assert "use_identity_as_username" not in service_part, "the plugin takes the service's username from its cert"
    acl = (tmp_path / "conf/acl").read_text()
    assert "%c" not in acl and "%u" not in acl and "pattern" not in acl, "devices are the plugin's, not the acl's"
    assert "user svc:ingest-0\ntopic read cogbert/v1/+/+/exp\ntopic write cogbert/v1/+/+/ack" in acl
    assert "user svc:rollout" in acl
    assert (tmp_path / "conf/cogbert_acl.so").exists()
    # The same configuration from a copy of the PKI without the CA key (as a broker host has it).
    import shutil
    public = tmp_path / "public-pki"
    shutil.copytree(pki.root, public, ignore=shutil.ignore_patterns("private"))
    assert not (public / "private").exists()
    again = write_config(public, tmp_path / "conf2", BrokerConfig(port=18883, autosave_interval=3))
    assert (tmp_path / "conf2/acl").read_text() == acl
    assert again.read_text().replace(str(public.resolve()), "P").replace(str(tmp_path / "conf2"), "C") == \
        text.replace(str(pki.root.resolve()), "P").replace(str(tmp_path / "conf"), "C")
