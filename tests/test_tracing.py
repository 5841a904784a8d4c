"""Tracing: nothing when not configured; with an exporter, an experience batch is one trace from
the device's upload through a real Mosquitto (the context in MQTT 5 user properties) to
ingestion and its store write, with the parents right."""

from __future__ import annotations

import time

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.ingest import IngestService, IngestSettings
from cogbert_cloud.data.store import open_store
from cogbert_edge import ActionSpace, Bundle, Device, DeviceSettings, ModelConfig, UploaderSettings, init_params
from cogbert_edge._internal import trace

from .fleet import broker, pki  # noqa: F401


@pytest.fixture
def exporter():
    exp = InMemorySpanExporter()
    # Not the global provider: the rest of the test session stays untraced.
    assert trace.configure_tracing("cogbert-test", exporter=exp, set_global=False)
    yield exp
    trace.shutdown_tracing()


def test_without_configuration_nothing_is_recorded_or_sent():
    assert trace.enabled()
    with trace.span("nothing", device="d") as s:
        assert not s.is_recording()
        assert trace.carrier() == {} and trace.mqtt_properties() is None
        assert trace.current_trace_id() is None
    assert trace.context_from_properties(None) is None and trace.context_from_carrier({}) is None


def test_spans_nest_and_their_context_travels_in_user_properties(exporter):
    with trace.span("outer", counter=7):
        props = trace.mqtt_properties()
        outer_trace = trace.current_trace_id()
        headers = trace.carrier()
    (key, value), = [p for p in props.UserProperty if p[0] == "traceparent"]
    assert value.split("-")[1] == outer_trace and headers["traceparent"] == value
    # Another process (or thread) continues the trace from the properties alone.
    with trace.span("inner", parent=trace.context_from_properties(props)):
        pass
    inner, outer = sorted(exporter.get_finished_spans(), key=lambda s: s.name)
    assert inner.parent.span_id == outer.context.span_id and inner.context.trace_id == outer.context.trace_id
    assert outer.attributes["counter"] == 7


def test_hostile_user_properties_start_a_new_trace_and_break_nothing(exporter):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("traceparent", "00-zzzz-not-hex-01"), ("x", "y" * 10000)]
    with trace.span("received", parent=trace.context_from_properties(p)):
        pass
    (s,) = exporter.get_finished_spans()
    assert s.parent is None


def test_an_experience_batch_is_one_trace_from_device_to_store(exporter, pki, broker, tmp_path):
    store_url = f"file://{tmp_path / 'store'}"
    ingest = IngestService(IngestSettings(broker=broker.service_url, pki=pki.root, store=store_url,
                                          client_id="ingest-trace")).start()
    cfg = ModelConfig(obs_dim=8, action=ActionSpace.of_discrete(3), encoder=(16,), hidden=16)
    Bundle.create(cfg, init_params(cfg, 0)).save(tmp_path / "m.safetensors")
    s = DeviceSettings(device_id="A", fleet="f", spool=tmp_path / "spool", bundle=tmp_path / "m.safetensors",
                       broker=broker.url, pki=pki.root, uploader=UploaderSettings(batch_bytes=2048, linger=0.05))
    try:
        with Device(s) as dev:
            for i in range(120):
                dev.act("line", np.full(8, i % 5, np.float32))
            deadline = time.monotonic() + 30
            while ExperienceDataset(open_store(store_url), "f").stats()["transitions"] < 100:
                assert time.monotonic() < deadline, "the batches were not stored"
                time.sleep(0.2)
    finally:
        ingest.stop()
    spans = exporter.get_finished_spans()
    uploads = {sp.context.span_id: sp for sp in spans if sp.name == "experience.upload"}
    ingested = [sp for sp in spans if sp.name == "ingest.batch"]
    writes = [sp for sp in spans if sp.name == "store.put"]
    assert uploads and ingested and writes
    assert all(u.attributes["device"] == "A" for u in uploads.values())
    # Ingestion ran on its own threads, its message from the broker: its spans' parents are the
    # devices' upload spans only because the context came in the MQTT 5 user properties.
    for sp in ingested:
        assert sp.parent is not None and sp.parent.span_id in uploads, sp
        assert sp.context.trace_id == uploads[sp.parent.span_id].context.trace_id
    by_id = {sp.context.span_id: sp for sp in ingested}
    for w in writes:
        assert w.parent.span_id in by_id and w.attributes["key"].startswith("experience/f/A/")
    assert len({sp.context.trace_id for sp in ingested}) == len(ingested), "one trace per batch"


def test_otlp_export_when_the_endpoint_is_configured(tmp_path):
    """A process with OTEL_EXPORTER_OTLP_ENDPOINT set sends its spans over OTLP/HTTP (here to a
    local HTTP server standing in for the collector); the same process without it sends nothing."""
    import http.server
    import os
    import subprocess
    import sys
    import threading

    got: list[tuple[str, str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("from cogbert_edge._internal import trace\n"
              "print(trace.configure_tracing('cogbert-otlp-test'))\n"
              "with trace.span('release.train', counter=5):\n"
              "    pass\n"
              "trace.shutdown_tracing()\n")
    try:
        env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT")
        q = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert q.returncode == 0 and q.stdout.strip() == "False", q.stderr
    finally:
        server.shutdown()
    assert len(got) == 1, got
    path, ctype, body = got[0]
    assert path == "/v1/traces" and ctype == "application/x-protobuf"
    assert b"release.train" in body and b"cogbert-otlp-test" in body


def test_a_release_is_one_trace_from_training_to_the_devices_installs(exporter, tmp_path):
    """train, gate and sign as children of the round's "release" span; the rollout's stage (with
    each offered device's reported install as an event) and its end join the same trace later,
    through the context stored with the release."""
    from cogbert_cloud.release.registry import Registry
    from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
    from cogbert_cloud.release.signing import KeyStore, create_release
    from cogbert_cloud.service.loop import ContinuousLearner, KeySigner, LoopSettings
    from cogbert_edge.wire.messages import StatusReport

    from .test_rollout import tel

    cfg = ModelConfig(obs_dim=8, action=ActionSpace.of_discrete(3), encoder=(16,), hidden=16)
    stable = Bundle.create(cfg, init_params(cfg, 0), model_id="stable").to_bytes()
    keys = KeyStore.init(tmp_path / "keys")
    store = open_store(f"file://{tmp_path / 'store'}")
    reg = Registry(store)
    reg.add(1, stable, create_release(stable, keys, counter=1, model="m", fleet="f"), state="stable")

    class Trainer:
        def train(self, round_dir, init, data_url, steps):
            out = round_dir / "model.safetensors"
            Bundle.create(cfg, init_params(cfg, 1), model_id="cand", parent="stable").save(out)
            return out

    now = [1000.0]
    fleet = FleetView()
    for i in range(6):
        fleet.on_telemetry(f"dev-{i}", tel(device=f"dev-{i}"), now=now[0])
    ctl = RolloutController(RolloutSettings(fleet="f", stage_seconds=10, report_timeout=5, min_devices=2), reg, None,
                            fleet, clock=lambda: now[0])
    learner = ContinuousLearner(LoopSettings(fleet="f", model="m", store_url=store.url, workdir=tmp_path / "work"),
                                reg, ctl, Trainer(), KeySigner(tmp_path / "keys", "m", "f"),
                                gate=lambda **kw: {"decision": "promote", "reasons": []})
    res = learner.round()
    assert res["decision"] == "rollout_started" and reg.get(2)["trace"]["traceparent"]
    ctl.tick()                                  # the first stage's offers
    offered = sorted(ctl.status()["offered"])
    assert offered
    now[0] += 11
    fleet.on_status(offered[0], StatusReport.parse("rejected:signature", counter=2), now=now[0])
    ctl.tick()                                  # the analysis: an install failure aborts
    assert ctl.status()["state"] == "aborted"

    spans = {sp.name: sp for sp in exporter.get_finished_spans()}
    root = spans["release"]
    assert root.parent is None and root.attributes["counter"] == 2
    for name in ("release.train", "release.gate", "release.sign"):
        assert spans[name].parent.span_id == root.context.span_id, name
    stage, aborted = spans["rollout.stage"], spans["rollout.aborted"]
    for sp in (stage, aborted):
        assert sp.context.trace_id == root.context.trace_id and sp.parent.span_id == root.context.span_id
    assert stage.attributes["verdict"] == "abort" and stage.start_time == int(1000.0 * 1e9)
    installs = {e.attributes["device"]: e.attributes["status"] for e in stage.events}
    assert set(installs) == set(offered) and installs[offered[0]] == "rejected:signature"
    assert all(v == "silent" for d, v in installs.items() if d != offered[0])
