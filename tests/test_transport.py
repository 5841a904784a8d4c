"""The mutual-TLS MQTT link against a real Mosquitto broker: who gets in, who may do what,
and what survives a broker restart. Names follow the properties in the security model."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time

import pytest

from cogbert_cloud.fleet.pki import PKI
from cogbert_edge.errors import LinkClosedError, PublishDeniedError, SubscribeDeniedError
from cogbert_edge.link.mqtt import LinkSettings, LinkState, MqttLink
from cogbert_edge.wire.topics import device_topic, fleet_release

from .fleet import broker, client_context, device_link, own_broker, pki, service_link, try_connect  # noqa: F401


def refused_in_tls(result: str) -> bool:
    """The TLS handshake refused the client (with TLS 1.3 the client may learn it only as the
    connection closing after its side finished), not the MQTT layer (a CONNACK refusal)."""
    return result.startswith(("handshake failed", "disconnected", "connection lost"))


def dev_ctx(pki, name):
    return client_context(pki.ca_cert_path, pki.root / "devices" / name / "cert.pem",
                          pki.root / "devices" / name / "key.pem")


def test_valid_device_connects_with_mutual_tls(pki, broker):
    assert try_connect(broker.port, dev_ctx(pki, "A"), client_id="A") == "connected"
    with device_link(broker, pki, "A") as link:
        link.wait_connected(5)
        assert link.state is LinkState.CONNECTED


def test_no_client_certificate_is_refused(pki, broker):
    assert refused_in_tls(try_connect(broker.port, client_context(pki.ca_cert_path), client_id="A"))


def test_certificate_from_another_ca_is_refused(pki, broker, tmp_path):
    other = PKI.init(tmp_path / "other")
    other.issue_device("A")     # same name, wrong CA
    ctx = client_context(pki.ca_cert_path, other.root / "devices/A/cert.pem", other.root / "devices/A/key.pem")
    assert refused_in_tls(try_connect(broker.port, ctx, client_id="A"))


def test_expired_certificate_is_refused(pki, broker):
    assert refused_in_tls(try_connect(broker.port, dev_ctx(pki, "expired"), client_id="expired"))


def test_broker_with_a_certificate_for_another_host_name_is_refused_by_the_device(pki, broker):
    # The server certificate names "localhost" only: reaching it as 127.0.0.1 must fail.
    result = try_connect(broker.port, dev_ctx(pki, "A"), client_id="A", host="127.0.0.1")
    assert result.startswith("handshake failed") and "mismatch" in result.lower(), result


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(pki, broker, tmp_path):
    ctx = client_context(pki.ca_cert_path, pki.root / "devices/A/cert.pem", pki.root / "devices/A/key.pem",
                         max_version=ssl.TLSVersion.TLSv1_1)
    # Positive control: this client context really can speak TLS 1.1 to a server that allows it.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.root / "server/cert.pem"), str(pki.root / "server/key.pem"))
    server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_ctx.minimum_version = server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        versions = []

        def serve():
            conn, _ = srv.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    versions.append(s.version())
            except ssl.SSLError as e:
                versions.append(str(e))

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert s.version() == "TLSv1.1"
        t.join(5)
    assert versions == ["TLSv1.1"]
    # The broker refuses the same client.
    assert refused_in_tls(try_connect(broker.port, ctx, client_id="A"))


def test_revoked_certificate_is_refused_and_its_live_session_dropped(pki, own_broker, tmp_path):
    pki.issue_device("doomed", fleet="f")
    with device_link(own_broker, pki, "doomed") as link:
        link.wait_connected(5)
        pki.revoke("doomed")
        deadline = time.monotonic() + 3
        while link.state is LinkState.CONNECTED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.state is not LinkState.CONNECTED, "a revoked identity's live session must be dropped"
        # Until the broker reloads the CRL the TLS handshake still passes (the plugin refuses
        # every topic); after the reload the handshake itself fails.
        assert "certificate verify failed" not in own_broker.log_tail(50)
        own_broker.reload()
        assert refused_in_tls(try_connect(own_broker.port, dev_ctx(pki, "doomed"), client_id="doomed"))
        assert own_broker.wait_for_log("certificate verify failed")
    assert try_connect(own_broker.port, dev_ctx(pki, "B"), client_id="B") == "connected"


@pytest.mark.parametrize("client_id", ["B", "+", "#"])
def test_device_cannot_publish_or_subscribe_to_another_devices_topics(pki, broker, client_id):
    with device_link(broker, pki, "A", client_id=client_id) as a, device_link(broker, pki, "B") as b:
        a.wait_connected(5)
        b.wait_connected(5)
        for kind in ("exp", "telemetry", "status"):
            with pytest.raises(PublishDeniedError, match="Not authorized"):
                a.publish(device_topic("f", "B", kind), b"forged").wait(5)
        for topic in (device_topic("f", "B", "ack"), device_topic("f", "B", "release"), "cogbert/v1/+/B/ack",
                      "cogbert/v1/f/+/ack", "cogbert/v1/#", "#", "+/+/+/+/+", "$share/g/cogbert/v1/f/B/ack"):
            with pytest.raises(SubscribeDeniedError, match="Not authorized"):
                a.subscribe(topic, lambda m: None).wait(5)
        # A's own topics work, and B's messages never reach A.
        a.publish(device_topic("f", "A", "exp"), b"mine").wait(5)
        a.subscribe(device_topic("f", "A", "ack"), lambda m: None).wait(5)
        # Downward topics are the cloud's: a device cannot write its own ack or release either.
        with pytest.raises(PublishDeniedError):
            a.publish(device_topic("f", "A", "ack"), b"self-ack").wait(5)
        with pytest.raises(PublishDeniedError):
            a.publish(fleet_release("f"), b"fake release").wait(5)


def test_services_get_only_their_roles_topics(pki, broker):
    got = []
    with service_link(broker, pki, "ingest") as ingest, device_link(broker, pki, "C") as c:
        ingest.subscribe("$share/ingest/cogbert/v1/+/+/exp", got.append).wait(5)
        c.wait_connected(5)
        c.publish(device_topic("f", "C", "exp"), b"batch").wait(5)
        ingest.publish(device_topic("f", "C", "ack"), b"ack").wait(5)
        with pytest.raises(PublishDeniedError):
            ingest.publish(device_topic("f", "C", "release"), b"not yours").wait(5)
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    assert [m.payload for m in got] == [b"batch"]


def _received(expected: set, got: list, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected <= {m.payload for m in got}:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("how", ["graceful", "kill -9"])
def test_broker_restart_keeps_subscriptions_and_delivers_unacknowledged_qos1(pki, own_broker, how):
    got_up, got_down = [], []
    # The subscriber must be back before the device resends: a restarted Mosquitto 2.0 does
    # not reliably restore shared subscriptions, and a message with no subscriber is dropped
    # (PUBACK "no matching subscribers"). The device backs off longer than the services: at
    # least 1.5 s after its last failed attempt, against at most 0.5 s (a loaded CI machine
    # once took longer than the 0.5 s minimum the device had before).
    # (End to end, the outbox resends whatever ingestion has not acknowledged.)
    with service_link(own_broker, pki, "ingest", client_id="ingest-test") as ingest, \
            service_link(own_broker, pki, "rollout", client_id="rollout-test") as rollout, \
            device_link(own_broker, pki, "C", backoff_min=3.0, backoff_max=3.0) as dev:
        ingest.subscribe("$share/ingest/cogbert/v1/+/+/exp", got_up.append).wait(5)
        dev.subscribe(device_topic("f", "C", "release"), got_down.append).wait(5)
        rollout.wait_connected(5)
        before = [dev.publish(device_topic("f", "C", "exp"), b"before-%d" % i) for i in range(20)]
        for h in before:
            h.wait(5)
        # A killed broker keeps only what its last autosave wrote (every 1 s here): let it save
        # the subscriber's session, so messages published later queue for it.
        time.sleep(1.5)

        own_broker.kill() if how == "kill -9" else own_broker.stop()
        during = [dev.publish(device_topic("f", "C", "exp"), b"during-%d" % i) for i in range(20)]
        time.sleep(0.3)
        assert not any(h.done() for h in during), "nothing can be acknowledged while the broker is down"
        own_broker.start()

        dev.wait_connected(10)
        for h in during:
            h.wait(10)             # paho resends unacknowledged QoS 1 after the reconnect
        assert _received({b"during-%d" % i for i in range(20)}, got_up)
        # The device's subscription is back, even though a killed broker forgot it.
        rollout.wait_connected(10)
        time.sleep(0.2)
        rollout.publish(device_topic("f", "C", "release"), b"manifest").wait(5)
        assert _received({b"manifest"}, got_down)
        assert dev.connects >= 2


def test_exceptions_in_callbacks_are_logged_and_the_link_keeps_working(pki, broker, caplog):
    seen = []

    def flaky(msg):
        seen.append(msg.payload)
        if msg.payload == b"boom":
            raise RuntimeError("callback bug")

    with service_link(broker, pki, "rollout", client_id="rollout-cb") as rollout, \
            device_link(broker, pki, "B") as dev:
        dev.subscribe(device_topic("f", "B", "release"), flaky).wait(5)
        rollout.wait_connected(5)
        with caplog.at_level(logging.ERROR, logger="cogbert.link"):
            rollout.publish(device_topic("f", "B", "release"), b"boom").wait(5)
            rollout.publish(device_topic("f", "B", "release"), b"after").wait(5)
            deadline = time.monotonic() + 5
            while b"after" not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
        assert seen == [b"boom", b"after"]
        assert dev.callback_errors == 1
        assert any("callback bug" in (r.exc_text or "") for r in caplog.records)


def test_connection_state_is_observable_and_close_fails_pending_work(pki, own_broker):
    states = []
    link = MqttLink(LinkSettings.for_device(own_broker.url, pki.root, "A", backoff_min=0.05, backoff_max=0.2))
    link.add_state_listener(states.append)
    link.start()
    link.wait_connected(5)
    own_broker.stop()
    deadline = time.monotonic() + 5
    while link.state is LinkState.CONNECTED and time.monotonic() < deadline:
        time.sleep(0.02)
    pending = link.publish(device_topic("f", "A", "exp"), b"never")
    link.close()
    assert states[:2] == [LinkState.CONNECTING, LinkState.CONNECTED]
    assert LinkState.BACKOFF in states and states[-1] is LinkState.CLOSED
    with pytest.raises(LinkClosedError):
        pending.wait(1)
    with pytest.raises(LinkClosedError):
        link.publish(device_topic("f", "A", "exp"), b"after close")


def test_plaintext_urls_are_refused():
    from cogbert_edge import ConfigError
    with pytest.raises(ConfigError, match="only over TLS"):
        LinkSettings(broker="mqtt://localhost:1883")


def test_publishing_from_many_threads_while_receiving_keeps_the_connection_healthy(pki, broker):
    """Ingestion's shape: the network thread receives large messages while worker threads
    publish acknowledgements and ack messages. paho would write to the TLS socket from all of
    those threads at once, corrupting the stream, unless told which thread is its own."""
    work: queue.Queue = queue.Queue()
    acked = []
    with service_link(broker, pki, "ingest", client_id="ingest-threads", manual_ack=True) as svc, \
            device_link(broker, pki, "A") as dev:
        svc.subscribe("$share/threads/cogbert/v1/+/A/exp", work.put).wait(5)

        def worker():
            while (m := work.get()) is not None:
                svc.publish(device_topic("f", "A", "ack"), b"ack" * 20)
                m.ack()
                acked.append(1)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        dev.wait_connected(5)
        for h in [dev.publish(device_topic("f", "A", "exp"), bytes(60_000)) for _ in range(800)]:
            h.wait(30)
        deadline = time.monotonic() + 20
        while len(acked) < 800 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
        assert len(acked) == 800
        assert svc.connects == 1, "concurrent writes must not corrupt the TLS stream"
