"""A real fleet for tests: a PKI on disk and Mosquitto brokers on free loopback ports."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.link.mqtt import LinkSettings, MqttLink


def make_pki(root: Path) -> PKI:
    pki = PKI.init(root)
    pki.issue_server(["localhost"])   # not 127.0.0.1: lets a test show hostname verification
    for d in ("A", "B", "C"):
        pki.issue_device(d, fleet="f")
    now = dt.datetime.now(dt.timezone.utc)
    pki.issue_device("expired", fleet="f", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    pki.issue_service("ingest")
    pki.issue_service("rollout")
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki, tmp_path_factory):
    b = LocalBroker(pki.root, tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(pki, tmp_path):
    """A broker this test may stop, kill and restart. It autosaves every second."""
    b = LocalBroker(pki.root, tmp_path / "broker",
                    config=BrokerConfig(autosave_interval=1, plugin_in_confdir=False)).start()
    yield b
    b.kill()


def device_link(broker: LocalBroker, pki: PKI, device: str, **kw) -> MqttLink:
    kw = {"backoff_min": 0.05, "backoff_max": 0.5, **kw}
    return MqttLink(LinkSettings.for_device(broker.url, pki.root, device, **kw)).start()


def service_link(broker: LocalBroker, pki: PKI, name: str, client_id: str = "", **kw) -> MqttLink:
    kw = {"backoff_min": 0.05, "backoff_max": 0.5, **kw}
    return MqttLink(LinkSettings.for_service(broker.service_url, pki.root, name, client_id=client_id,
                                             **kw)).start()


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")   # let *our* side offer old TLS; the broker must refuse
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
    return ctx


def try_connect(port: int, ctx: ssl.SSLContext, *, client_id: str, host: str = "localhost",
                timeout: float = 3.0) -> str:
    """Connect once with ``ctx`` as ``client_id``: "connected", or the reason it did not. (The
    broker binds client ids to identities, so a probe must name the one it is allowed.)"""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.tls_set_context(ctx)
    result: list[str] = []
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        result.append("connected" if not reason_code.is_failure else f"refused: {reason_code}")
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        result.append(f"disconnected: {reason_code}")
        done.set()

    c.on_connect, c.on_disconnect = on_connect, on_disconnect
    try:
        c.connect(host, port, keepalive=10)
    except (ssl.SSLError, OSError) as e:
        return f"handshake failed: {e}"
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        if c.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
            result.append("connection lost")
            break
    c.disconnect()
    return result[0] if result else "no answer"
