"""`cogbert fleet` against the operator API on a real port: tables and --json, URL and token
from flags, environment or an INI file, refusals in one line with exit 2; device tags set by
the API (and at provisioning), a rollout that targets a tag, and per-rollout abort thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import uvicorn

from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import free_port
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.fleet.tags import DeviceTags
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_cloud.service.api import ControlPlane, Tokens, create_app, token_digest
from cogbert_edge.wire.messages import OutboxTelemetry

from .test_rollout import small_bundle, tel

BIN = Path(sys.executable).parent
READ, OPERATE = "cli-read", "cli-operate"
DEVICES = [f"press-{i}" for i in range(8)]


@pytest.fixture
def api(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    reg = Registry(store)
    reg.add(1, small_bundle(1), b"m1", state="stable")
    reg.add(2, small_bundle(2), b"m2", rollback=b"r3", parent_release=1, evaluation={"decision": "promote"})
    fleet = FleetView()
    for i, d in enumerate(DEVICES):
        fleet.on_telemetry(d, tel(model="m1", release=1, outbox=OutboxTelemetry(pending=i), lat=90.0 + i))
    ctl = RolloutController(RolloutSettings(fleet="f", stage_seconds=3600), reg, None, fleet)
    cp = ControlPlane(reg, ctl, fleet, tags=DeviceTags(store))
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
            assert time.monotonic() < deadline
            time.sleep(0.1)
    yield url, cp
    server.should_exit = True
    t.join(10)


def fleet(url: str, *args: str, token: str | None = OPERATE, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COGBERT_API")}
    cmd = [str(BIN / "cogbert"), "fleet", *args]
    cmd += (["--api", url] if url else []) + (["--token", token] if token else [])
    return subprocess.run(cmd, capture_output=True, text=True, env={**base, "HOME": "/nonexistent", **(env or {})},
                          timeout=60)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cogbert: error: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_devices_and_releases_as_tables_and_json(api):
    url, _ = api
    p = fleet(url, "devices", token=READ)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "TAGS", "RELEASE", "LAST", "SEEN", "OUTBOX", "P95", "DECISIONS", "ERRORS",
                                "STATUS"]
    assert len(lines) == 1 + len(DEVICES) and lines[1].startswith("press-0 ")
    js = json.loads(fleet(url, "devices", "--json", token=READ).stdout)
    assert [d["device"] for d in js] == DEVICES and js[3]["outbox_pending"] == 3
    r = fleet(url, "releases", token=READ)
    assert r.returncode == 0 and "RELEASE" in r.stdout.splitlines()[0]
    row2 = [line for line in r.stdout.splitlines() if line.startswith("2 ")][0]
    assert "candidate" in row2 and "promote" in row2


def test_url_and_token_from_the_environment_or_a_config_file(api, tmp_path):
    url, _ = api
    p = fleet("", "devices", "--json", token=None, env={"COGBERT_API_URL": url, "COGBERT_API_TOKEN": READ})
    assert p.returncode == 0 and len(json.loads(p.stdout)) == len(DEVICES)
    ini = tmp_path / "api.ini"
    ini.write_text(f"[api]\nurl = {url}\ntoken = {READ}\n")
    p = fleet("", "releases", "--json", token=None, env={"COGBERT_API_CONFIG": str(ini)})
    assert p.returncode == 0 and {r["counter"] for r in json.loads(p.stdout)} == {1, 2}
    # The flag wins over the file.
    one_line_error(fleet("", "devices", "--config", str(ini), token="wrong"), "401", "unknown token")


def test_refusals_are_one_line_and_exit_2(api, tmp_path):
    url, _ = api
    one_line_error(fleet(url, "devices", token=None), "no API token")
    one_line_error(fleet(url, "rollout", "start", "2", token=READ), "403", "may read but not operate")
    one_line_error(fleet(url, "rollout", "abort"), "409", "no rollout in progress")
    one_line_error(fleet(url, "rollout", "start", "1"), "409", "not a candidate")
    one_line_error(fleet(url, "rollout", "start", "2", "--max-error-rate", "7"), "422", "max_error_rate")
    one_line_error(fleet(url, "rollout", "start"), "needs the candidate")
    one_line_error(fleet("http://127.0.0.1:1", "devices"), "cannot reach the operator API")
    one_line_error(fleet("ftp://x", "devices"), "http://")
    one_line_error(fleet(url, "devices", "--config", str(tmp_path / "missing.ini")), "no such config file")


def test_a_rollout_with_its_own_thresholds_then_pause_resume_abort(api):
    url, cp = api
    p = fleet(url, "rollout", "start", "2", "--max-error-rate", "0.05", "--stage-timeout", "900",
              "--reward-alpha", "0.01", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["state"] == "running" and r["settings"]["max_error_rate"] == 0.05
    assert r["settings"]["stage_timeout"] == 900 and r["settings"]["reward_alpha"] == 0.01
    assert r["settings"]["max_nan_rate"] == RolloutSettings().max_nan_rate, "the rest from the service"
    assert cp.controller.s.max_error_rate == RolloutSettings().max_error_rate, "the service's own unchanged"
    status = fleet(url, "rollout", "status", token=READ)
    assert status.stdout.startswith("rollout of release 2 (stable 1): running, stage 0")
    assert "paused" in fleet(url, "rollout", "pause").stdout
    assert "running" in fleet(url, "rollout", "resume").stdout
    out = fleet(url, "rollout", "abort", "--reason", "cli test").stdout
    assert "aborted" in out and "reason: cli test" in out and "result: rolled_back" in out
    audit = [e for e in cp.registry.audit.entries() if e["event"] == "rollout_started"]
    assert audit[-1]["overrides"] == {"max_error_rate": 0.05, "stage_timeout": 900.0, "reward_alpha": 0.01}


def test_tags_by_the_api_and_a_rollout_that_targets_a_tag(api):
    url, cp = api
    tagged = DEVICES[:5]
    for d in tagged:
        req = urllib.request.Request(f"{url}/v1/devices/{d}/tags", method="PUT",
                                     data=json.dumps({"tags": ["line-a", "eu"]}).encode(),
                                     headers={"Authorization": f"Bearer {OPERATE}", "Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(req, timeout=5).read())["tags"] == ["eu", "line-a"]
    bad = urllib.request.Request(f"{url}/v1/devices/{DEVICES[0]}/tags", method="PUT",
                                 data=json.dumps({"tags": ["no spaces"]}).encode(),
                                 headers={"Authorization": f"Bearer {OPERATE}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad, timeout=5)
    assert e.value.code == 422
    listed = json.loads(fleet(url, "devices", "--tag", "line-a", "--json", token=READ).stdout)
    assert [d["device"] for d in listed] == tagged and listed[0]["tags"] == ["eu", "line-a"]
    one_line_error(fleet(url, "rollout", "start", "2", "--tag", "line-b"), "409", "line-b")
    r = json.loads(fleet(url, "rollout", "start", "2", "--tag", "line-a", "--json").stdout)
    assert r["tag"] == "line-a"
    cp.controller.tick()
    offered = set(cp.controller.status()["offered"])
    assert offered and offered <= set(tagged), offered
    assert set(cp.controller._control()) <= set(tagged), "control devices come from the tag too"
    assert not offered & set(cp.controller._control())


def test_tags_given_at_provisioning_reach_the_tag_store(tmp_path):
    pki = PKI.init(tmp_path / "pki")
    pki.issue_device("press-1", fleet="f", tags=["line-a", "rev2"])
    pki.issue_device("press-2", fleet="f")
    p = subprocess.run([str(BIN / "cogbert"), "pki", "issue-device", str(tmp_path / "pki"), "press-3", "--fleet", "f",
                        "--tag", "line-b"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    tags = DeviceTags(open_store(f"file://{tmp_path / 'store'}"))
    tags.set("press-3", ["kept"])             # tags set by the API are not overwritten
    assert tags.import_pki(pki.root) == 1
    assert tags.all() == {"press-1": ["line-a", "rev2"], "press-3": ["kept"]}
    bad = subprocess.run([str(BIN / "cogbert"), "pki", "issue-device", str(tmp_path / "pki"), "press-4",
                          "--tag", "bad tag"], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad tag" in bad.stderr
