"""The console's HTTP side: the page and its files (no data, a strict CSP), the two read
endpoints it adds under the API's auth, and a screenshot through Chromium's own headless mode
(what the demo writes into its report) of a live API server."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import free_port
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_cloud.service.api import ControlPlane, Tokens, create_app, token_digest
from cogbert_cloud.service.console.screenshot import find_chromium, screenshot
from cogbert_edge.wire.messages import OutboxTelemetry

from .test_rollout import small_bundle, tel

READ, OPERATE = "read-secret", "operate-secret"


def make_plane(tmp_path: Path) -> ControlPlane:
    reg = Registry(open_store(f"file://{tmp_path / 'store'}"))
    reg.add(1, small_bundle(1), b"m1", state="stable")
    reg.add(2, small_bundle(2), b"m2", rollback=b"r3", parent_release=1, evaluation={"decision": "promote"})
    fleet = FleetView()
    for i in range(3):
        fleet.on_telemetry(f"press-{i}", tel(model="m1", release=1, outbox=OutboxTelemetry(pending=5 * i),
                                            decisions=1000 + i, lat=80.0 + i))
    ctl = RolloutController(RolloutSettings(fleet="f"), reg, None, fleet)
    return ControlPlane(reg, ctl, fleet)


@pytest.fixture
def client(tmp_path):
    cp = make_plane(tmp_path)
    c = TestClient(create_app(cp, Tokens(read=(token_digest(READ),), operate=(token_digest(OPERATE),))))
    c.control_plane = cp
    return c


def h(token):
    return {"Authorization": f"Bearer {token}"}


def test_the_page_and_its_files_hold_no_data_and_load_nothing_from_elsewhere(client):
    page = client.get("/console")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page.text and "https://" not in page.text
    js = client.get("/console/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in js.text, "data goes into the page as text only"
    assert "http://" not in js.text and "https://" not in js.text
    assert client.get("/console/static/app.css").status_code == 200
    assert client.get("/console/static/..%2Fapi.py").status_code == 404
    assert client.get("/console/static/secrets.txt").status_code == 404
    assert client.get("/", follow_redirects=False).headers["location"] == "/console"


def test_whoami_and_audit_need_a_token_and_tell_the_role(client):
    assert client.get("/v1/whoami").status_code == 401
    assert client.get("/v1/whoami", headers=h("guess")).status_code == 401
    assert client.get("/v1/whoami", headers=h(READ)).json() == {"role": "read"}
    assert client.get("/v1/whoami", headers=h(OPERATE)).json() == {"role": "operate"}
    assert client.get("/v1/audit").status_code == 401
    client.post("/v1/rollouts", json={"candidate": 2}, headers=h(OPERATE))
    client.post("/v1/rollouts/current/abort", json={"reason": "from the test"}, headers=h(OPERATE))
    entries = client.get("/v1/audit?limit=3", headers=h(READ)).json()
    assert len(entries) == 3
    assert entries[0]["time_s"] >= entries[1]["time_s"] >= entries[2]["time_s"], "newest first"
    assert any(e["event"] == "rollout_aborted" and e.get("reasons") == ["from the test"] for e in entries)
    for bad in ("0", "1001", "x"):
        assert client.get(f"/v1/audit?limit={bad}", headers=h(READ)).status_code == 422


@pytest.fixture
def live(tmp_path):
    """The API on a real port (uvicorn in a thread), as `cloud serve` runs it."""
    cp = make_plane(tmp_path)
    app = create_app(cp, Tokens(read=(token_digest(READ),), operate=(token_digest(OPERATE),)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            break
        except OSError:
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
    yield url, cp
    server.should_exit = True
    t.join(10)


def test_a_screenshot_of_the_signed_in_console(live, tmp_path):
    url, cp = live
    assert find_chromium(), "./run setup test installs Debian's chromium"
    cp.controller.start(2, actor="test")
    out = screenshot(url, READ, tmp_path / "console.png", tab="rollout")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000     # a rendered page, not a blank one (~3 KB)
    assert screenshot(url, READ, tmp_path / "other.png", tab="fleet") is not None
    # A refused token still gives a picture (of the sign-in page), never an exception.
    assert screenshot(url, "wrong", tmp_path / "refused.png") is not None
    assert out.stat().st_size != (tmp_path / "refused.png").stat().st_size
