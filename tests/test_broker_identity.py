"""Identities bound to their fleet and their listener, tried with real `mosquitto_pub` and
`mosquitto_sub` clients (as an attacker holding one valid certificate would) against a broker
configured by `cogbert broker config`."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.link.mqtt import LinkSettings, MqttLink

from .fleet import service_link

PUB, SUB = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
if not (PUB and SUB):   # ./run test installs them (Debian: mosquitto-clients)
    pytest.fail("mosquitto_pub and mosquitto_sub are needed (apt-get install mosquitto-clients)",
                pytrace=False)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    pki.issue_device("sim-1", fleet="sim")
    pki.issue_device("plant-1", fleet="plant")
    pki.issue_service("ingest")
    pki.issue_service("rollout")
    broker = LocalBroker(pki.root, root / "broker").start()
    yield {"pki": pki, "broker": broker}
    broker.stop()


def _tls(pki: PKI, who: str) -> list[str]:
    kind, name = who.split(":")
    d = pki.root / ("devices" if kind == "device" else "services") / name
    return ["--cafile", str(pki.ca_cert_path), "--cert", str(d / "cert.pem"), "--key", str(d / "key.pem")]


def pub(site, who: str, port: int, client_id: str, topic: str) -> str:
    p = subprocess.run([PUB, "-h", "localhost", "-p", str(port), *_tls(site["pki"], who), "-i", client_id,
                        "-t", topic, "-m", "x", "-q", "1", "-V", "mqttv5"],
                       capture_output=True, text=True, timeout=20)
    out = (p.stdout + p.stderr).strip()
    return "ok" if p.returncode == 0 and not out else out


def sub(site, who: str, port: int, client_id: str, topic: str) -> str:
    p = subprocess.run([SUB, "-h", "localhost", "-p", str(port), *_tls(site["pki"], who), "-i", client_id,
                        "-t", topic, "-q", "1", "-V", "mqttv5", "-W", "1", "-C", "1"],
                       capture_output=True, text=True, timeout=20)
    out = (p.stdout + p.stderr).strip()
    return "subscribed" if "Timed out" in out else out     # granted, and nothing arrived in 1 s


def test_a_device_may_write_experience_only_into_its_own_fleet(site):
    port = site["broker"].port
    assert pub(site, "device:sim-1", port, "sim-1", "cogbert/v1/sim/sim-1/exp") == "ok"     # control
    for topic in ("cogbert/v1/plant/sim-1/exp", "cogbert/v1/plant/sim-1/telemetry", "cogbert/v1/plant/sim-1/status",
                  "cogbert/v1/plant/plant-1/exp"):
        assert "Not authorized" in pub(site, "device:sim-1", port, "sim-1", topic), topic


def test_a_device_may_subscribe_only_to_its_own_fleets_topics(site):
    port = site["broker"].port
    assert sub(site, "device:sim-1", port, "sim-1", "cogbert/v1/sim/release") == "subscribed"
    assert sub(site, "device:sim-1", port, "sim-1", "cogbert/v1/sim/sim-1/ack") == "subscribed"
    for topic in ("cogbert/v1/plant/release", "cogbert/v1/plant/sim-1/ack", "cogbert/v1/+/release",
                  "cogbert/v1/plant/plant-1/release"):
        assert "denied" in sub(site, "device:sim-1", port, "sim-1", topic), topic


def _tls_refusals(broker) -> int:
    p = broker.workdir / "mosquitto.log"
    return p.read_text(errors="replace").count("certificate verify failed")


def _refused_in_tls(site, attempt) -> str:
    """Run ``attempt``; it must fail, and the broker must have refused it in the TLS handshake
    (its log says so: the client may only see the connection drop)."""
    before = _tls_refusals(site["broker"])
    out = attempt()
    deadline = time.monotonic() + 3
    while _tls_refusals(site["broker"]) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out not in ("ok", "subscribed"), out
    assert _tls_refusals(site["broker"]) > before, f"not refused in the handshake: {out}"
    return out


def test_a_device_certificate_is_refused_by_the_service_listener(site):
    port = site["broker"].service_port
    for client_id in ("sim-1", "ingest-1", "ingest"):
        _refused_in_tls(site, lambda client_id=client_id: pub(site, "device:sim-1", port, client_id,
                                                              "cogbert/v1/sim/sim-1/ack"))
    _refused_in_tls(site, lambda: sub(site, "device:sim-1", port, "ingest-1", "$share/ingest/cogbert/v1/+/+/exp"))


def test_a_service_certificate_is_refused_by_the_device_listener(site):
    port = site["broker"].port
    for topic in ("cogbert/v1/sim/sim-1/ack", "cogbert/v1/sim/release"):
        _refused_in_tls(site, lambda topic=topic: pub(site, "service:ingest", port, "svc:ingest", topic))
    _refused_in_tls(site, lambda: sub(site, "service:ingest", port, "ingest-x", "cogbert/v1/+/+/exp"))


def test_no_client_can_take_over_the_ingestion_replicas_session(site):
    broker = site["broker"]
    with service_link(broker, site["pki"], "ingest", client_id="ingest-0") as ingest:
        ingest.wait_connected(5)
        # Another service's certificate may not use the ingestion replica's client id ...
        assert "Not authorized" in pub(site, "service:rollout", broker.service_port, "ingest-0",
                                       "cogbert/v1/sim/sim-1/release")
        # ... nor may the same identity's client ids outside its NAME-SUFFIX space.
        assert "Not authorized" in pub(site, "service:ingest", broker.service_port, "rollout-x",
                                       "cogbert/v1/sim/sim-1/ack")
        # A device's cannot reach the listener at all (above). The replica was never kicked.
        time.sleep(0.5)
        assert ingest.connects == 1
        # Positive control: the identity's own suffix works.
        assert pub(site, "service:ingest", broker.service_port, "ingest-1", "cogbert/v1/sim/sim-1/ack") == "ok"


def test_no_device_can_take_over_another_devices_session(site):
    broker, pki = site["broker"], site["pki"]
    log = broker.workdir / "mosquitto.log"

    def connects(client_id: str) -> int:
        return log.read_text(errors="replace").count(f" as {client_id} (")

    victim = MqttLink(LinkSettings.for_device(broker.url, pki.root, "plant-1", backoff_min=0.05)).start()
    try:
        victim.wait_connected(5)
        before = (connects("plant-1"), connects("sim-1"))
        # sim-1 asks for plant-1's client id: the broker gives it its own (the CN) instead.
        assert pub(site, "device:sim-1", broker.port, "plant-1", "cogbert/v1/sim/sim-1/status") == "ok"
        deadline = time.monotonic() + 3
        while connects("sim-1") == before[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (connects("plant-1"), connects("sim-1")) == (before[0], before[1] + 1)
        time.sleep(0.3)
        assert victim.connects == 1, "plant-1's session must not be taken over"
    finally:
        victim.close()
