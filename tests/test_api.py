"""The operator API: auth and roles, bad input gets 4xx with a message, and /metrics passes
promtool."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from cogbert_cloud.data.store import open_store
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_cloud.service.api import ControlPlane, Tokens, create_app, token_digest
from cogbert_edge.wire.messages import OutboxTelemetry

from .test_rollout import small_bundle, tel

READ, OPERATE = "read-secret", "operate-secret"


@pytest.fixture
def api(tmp_path):
    reg = Registry(open_store(f"file://{tmp_path}"))
    reg.add(1, small_bundle(1), b"m1", state="stable")
    reg.add(2, small_bundle(2), b"m2", rollback=b"r3")
    fleet = FleetView()
    fleet.on_telemetry("dev-1", tel(model="m1", release=1, outbox=OutboxTelemetry(pending=12)))
    link = {"up": True}
    ctl = RolloutController(RolloutSettings(fleet="f"), reg, None, fleet)
    cp = ControlPlane(reg, ctl, fleet, link_up=lambda: link["up"])
    client = TestClient(create_app(cp, Tokens(read=(token_digest(READ),), operate=(token_digest(OPERATE),))))
    client.control_plane = cp
    return client, link, reg


def h(token):
    return {"Authorization": f"Bearer {token}"}


def test_health_and_readiness(api):
    client, link, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    link["up"] = False
    r = client.get("/ready")
    assert r.status_code == 503 and "broker link is down" in r.json()["problems"]


@pytest.mark.parametrize("path", ["/v1/releases", "/v1/rollouts", "/v1/devices", "/v1/releases/1"])
def test_reads_need_a_valid_token(api, path):
    client, _, _ = api
    assert client.get(path).status_code == 401
    assert client.get(path, headers=h("guess")).status_code == 401
    assert client.get(path, headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get(path, headers=h(READ)).status_code == 200
    assert client.get(path, headers=h(OPERATE)).status_code == 200


def test_operating_needs_the_operate_role(api):
    client, _, reg = api
    r = client.post("/v1/rollouts", json={"candidate": 2}, headers=h(READ))
    assert r.status_code == 403 and "may read but not operate" in r.json()["detail"]
    r = client.post("/v1/rollouts", json={"candidate": 2}, headers=h(OPERATE))
    assert r.status_code == 201 and r.json()["candidate"] == 2
    assert client.post("/v1/rollouts/current/pause", headers=h(OPERATE)).json()["state"] == "paused"
    assert client.post("/v1/rollouts/current/resume", headers=h(OPERATE)).json()["state"] == "running"
    r = client.post("/v1/rollouts/current/abort", json={"reason": "looks wrong"}, headers=h(OPERATE))
    assert r.json()["state"] == "aborted" and reg.get(2)["state"] == "rolled_back"
    assert any(e.get("actor") == "api" for e in reg.audit.entries())


@pytest.mark.parametrize("method,path,body,code", [
    ("post", "/v1/rollouts", {"candidate": "two"}, 422),
    ("post", "/v1/rollouts", {"candidate": -1}, 422),
    ("post", "/v1/rollouts", {}, 422),
    ("post", "/v1/rollouts", None, 422),
    ("post", "/v1/rollouts", {"candidate": 99}, 404),
    ("post", "/v1/rollouts", {"candidate": 1}, 409),            # the stable release is no candidate
    ("post", "/v1/rollouts/current/abort", {"reason": "x"}, 409),   # nothing to abort
    ("post", "/v1/rollouts/current/explode", None, 422),
    ("post", "/v1/rollouts/current/abort", {"reason": "x" * 600}, 422),
    ("get", "/v1/releases/abc", None, 422),
    ("get", "/v1/releases/77", None, 404),
    ("get", "/v1/devices/nobody", None, 404),
    ("get", "/v1/nothing-here", None, 404),
])
def test_invalid_requests_get_a_4xx_with_a_message(api, method, path, body, code):
    client, _, _ = api
    r = getattr(client, method)(path, headers=h(OPERATE), **({"json": body} if body is not None else {}))
    assert r.status_code == code, r.text
    assert r.json().get("detail")


def test_devices_show_version_last_seen_outbox_depth_and_telemetry(api):
    client, _, _ = api
    (d,) = client.get("/v1/devices", headers=h(READ)).json()
    assert d["device"] == "dev-1" and d["release"] == 1 and d["outbox_pending"] == 12 and d["last_seen"]


def test_metrics_are_prometheus_exposition_that_promtool_accepts(api, tmp_path):
    client, _, _ = api
    client.get("/v1/releases", headers=h(READ))
    text = client.get("/metrics").text
    assert "cogbert_devices 1.0" in text and 'cogbert_releases{state="candidate"} 1.0' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by ./run setup (Debian: prometheus; macOS: brew install prometheus)"
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("raw", ['{"candidate": NaN}', '{"candidate": Infinity}', '{"candidate": 1e400}',
                                 '{"candidate": -Infinity}', '{"candidate": 2.5}', '{"candidate": 1e300}'])
def test_numbers_that_are_not_integers_in_range_are_422_not_409(api, raw):
    client, _, reg = api
    r = client.post("/v1/rollouts", content=raw, headers={**h(OPERATE), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "candidate"
    assert reg.get(2)["state"] == "candidate", "a refused request changes nothing"


def test_an_internal_bug_is_a_logged_and_counted_500_not_a_4xx(api, caplog):
    client, _, _ = api
    fleet = client.control_plane.fleet
    snapshot = fleet.snapshot

    def broken():
        raise ValueError("a bug, not the client's mistake")

    fleet.snapshot = broken
    quiet = TestClient(client.app, raise_server_exceptions=False)
    with caplog.at_level("ERROR", logger="cogbert.api"):
        r = quiet.get("/v1/devices", headers=h(READ))
    assert r.status_code == 500 and "a bug" not in r.text
    fleet.snapshot = snapshot
    assert any("a bug, not the client's mistake" in (rec.exc_text or "") for rec in caplog.records)
    assert "cogbert_api_errors_total 1.0" in quiet.get("/metrics").text


def test_invented_methods_and_paths_do_not_grow_the_metric_series(api):
    client, _, _ = api
    for i in range(300):
        client.request(f"BREW{i}", f"/v1/teapot-{i}")
        client.request("GET", f"/v1/releases/{i}x", headers=h(READ))
        client.request(f"X{i}", "/v1/releases", headers=h(READ))
        client.get(f"/random/{i}?q={i}")
    text = client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("cogbert_api_requests_total{")]
    assert len(series) <= 8, series
    assert not any("BREW" in s or "teapot" in s or "random" in s for s in series)
    assert any('method="other"' in s for s in series) and any('path="unmatched"' in s for s in series)
