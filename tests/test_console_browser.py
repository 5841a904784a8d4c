"""The web console in a real browser against a running fleet: Mosquitto, `cogbert cloud ingest`,
`cogbert cloud serve` and `cogbert device simulate` as processes, Debian's Chromium driven by
Playwright. An operator signs in with a token, sees the devices, starts nothing (a read token
cannot), signs in with an operate token, aborts the rollout the CLI started, and sees the
rollback: the rollout aborted, the candidate rolled back, the audit entry, and the canary
devices back on the stable bundle under the rollback's counter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import LocalBroker, free_port
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.signing import KeyStore, create_release
from cogbert_cloud.service.api import token_digest
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params

from .helpers import log_tail, spawn_logged

BIN = Path(sys.executable).parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
READ, OPERATE = "console-read-token", "console-operate-token"
DEVICES = 6


def _wait(cond, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited: {log_tail(Path(p.log))}"  # type: ignore[attr-defined]
        try:
            v = cond()
            if v:
                return v
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _get(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


class Fleet:
    """A small fleet on this machine, every part a real process or server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        pki = PKI.init(root / "pki")
        pki.issue_server(["localhost"])
        for svc in ("ingest", "rollout"):
            pki.issue_service(svc)
        for i in range(DEVICES):
            pki.issue_device(f"sim-{i:04d}", fleet="plant")
        self.pki = pki
        keys = KeyStore.init(root / "keys")
        cfg = ModelConfig(obs_dim=16, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
        b1 = Bundle.create(cfg, init_params(cfg, 0, policy_gain=1.0), model_id="chain-1").to_bytes()
        b2 = Bundle.create(cfg, init_params(cfg, 1, policy_gain=1.0), model_id="chain-2", parent="chain-1").to_bytes()
        (root / "model.safetensors").write_bytes(b1)
        self.store_url = f"file://{root / 'store'}"
        reg = Registry(open_store(self.store_url))
        def sign(bundle: bytes, counter: int) -> bytes:
            return create_release(bundle, keys, counter=counter, model="chain", fleet="plant")

        reg.add(1, b1, sign(b1, 1), state="stable", actor="test")
        # The candidate with its pre-signed rollback: the stable bundle under counter 3.
        reg.add(2, b2, sign(b2, 2), rollback=sign(b1, 3),
                parent_release=1, evaluation={"decision": "promote", "wis_gain": 0.12}, actor="test")
        self.broker = LocalBroker(pki.root, root / "broker").start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> Fleet:
        env = {**os.environ, "COGBERT_SERVE_READ_TOKENS": token_digest(READ),
               "COGBERT_SERVE_OPERATE_TOKENS": token_digest(OPERATE)}
        log = BIN / "cogbert"
        self.spawn([str(log), "--log-level", "WARNING", "cloud", "ingest", "--broker", self.broker.service_url,
                    "--pki", str(self.pki.root), "--store", self.store_url, "--client-id", "ingest-console"])
        # Long stages: the rollout stays in its first stage until the operator acts.
        self.serve = self.spawn([str(log), "--log-level", "WARNING", "cloud", "serve", "--store", self.store_url,
                                 "--broker", self.broker.service_url, "--pki", str(self.pki.root), "--fleet", "plant",
                                 "--model", "chain", "--host", "127.0.0.1", "--port", str(self.port),
                                 "--stage-seconds", "3600", "--min-devices", "2"], env=env)
        _wait(lambda: _get(f"{self.url}/ready")["ready"], 60, "serve /ready", self.procs)
        self.spawn([str(log), "--log-level", "WARNING", "device", "simulate", "--devices", str(DEVICES),
                    "--prefix", "sim", "--fleet", "plant", "--broker", self.broker.url, "--pki", str(self.pki.root),
                    "--spool", str(self.root / "spool"), "--bundle", str(self.root / "model.safetensors"),
                    "--env", "sensor", "--trust-root", str(self.root / "keys" / "root.json"), "--model-name", "chain",
                    "--steps", "3000", "--rate", "20", "--telemetry-interval", "1", "--keep-running", "900",
                    "--trial-decisions", "20", "--trial-seconds", "1", "--drain-timeout", "10"])
        _wait(lambda: len(_get(f"{self.url}/v1/devices", READ)) == DEVICES, 90, "every device's telemetry",
              self.procs)
        return self

    def spawn(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.root / "logs" / f"{len(self.procs)}-{Path(args[0]).name}.log"
        p = spawn_logged(args, log, env=env or os.environ.copy(), stdout=subprocess.DEVNULL)
        p.log = log  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.broker.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("console-fleet"))
    try:
        yield f.start()
    finally:
        f.stop()


def cli(fleet: Fleet, *args: str, token: str = OPERATE) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cogbert"), "fleet", *args, "--api", fleet.url, "--token", token],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "./run setup test installs Debian's chromium"
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 900})
        try:
            yield ctx
        finally:
            ctx.close()


def sign_in(page, url: str, token: str) -> None:
    page.goto(f"{url}/console")
    page.fill("#token", token)
    page.click("#login-button")
    page.wait_for_selector("#who:not([hidden])")


def test_sign_in_see_the_fleet_abort_the_rollout_and_see_the_rollback(fleet, browser, tmp_path):
    tmp_path = Path(os.environ.get("COGBERT_TEST_SHOTS", tmp_path))
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # Browser console errors, but the one the wrong token below causes on purpose.
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None)

    # A wrong token is refused on the page, and nothing is shown.
    page.goto(f"{fleet.url}/console")
    page.fill("#token", "not-a-token")
    page.click("#login-button")
    expect(page.locator("#login-error")).to_contain_text("401")
    assert page.is_hidden("#fleet")

    # The read role sees the running fleet.
    sign_in(page, fleet.url, READ)
    assert page.text_content("#role") == "signed in: read"
    expect(page.locator("#devices tbody tr")).to_have_count(DEVICES)
    assert page.text_content("#count-devices b") == str(DEVICES)
    page.fill("#device-filter", "sim-0003")
    expect(page.locator("#devices tbody tr")).to_have_count(1)
    page.fill("#device-filter", "")
    page.click("nav button[data-tab=releases]")
    page.wait_for_selector("#release-table tr[data-release='2']")
    assert "candidate" in page.text_content("#release-table tr[data-release='2']")
    assert "from release 1" in page.text_content("#release-table tr[data-release='2']")

    # The operator CLI starts a rollout of release 2; the console shows it running, and a read
    # token may not abort it.
    started = cli(fleet, "rollout", "start", "2")
    assert started.returncode == 0, started.stderr
    assert "rollout of release 2 (stable 1): running" in started.stdout
    page.click("nav button[data-tab=rollout]")
    page.wait_for_selector("#rollout-summary .state.running")
    assert page.is_disabled("#abort")

    # The operate role: wait for the canary cohort's install, abort, confirm, see the rollback.
    page.click("#logout")
    sign_in(page, fleet.url, OPERATE)
    page.click("nav button[data-tab=rollout]")
    expect(page.locator("#cohort tbody tr").nth(1)).to_be_visible(timeout=60_000)   # at least min_devices
    page.wait_for_selector("#cohort .state.committed, #cohort .state.trial", timeout=60_000)
    assert page.is_enabled("#abort")
    page.click("#abort")
    page.wait_for_selector("#confirm[open]")
    assert "send every device the stable release 1 again" in page.text_content("#confirm-text")
    page.fill("#confirm-reason", "browser test: looks wrong")
    page.click("#confirm-ok")
    page.wait_for_selector("#rollout-summary .state.aborted")
    page.wait_for_selector("#rollout-summary .state.rolled_back")
    assert "browser test: looks wrong" in page.text_content("#rollout-summary")
    assert page.is_disabled("#abort") and page.is_disabled("#pause")
    page.click("nav button[data-tab=releases]")
    page.wait_for_selector("#release-table tr[data-release='2'] .state.rolled_back")
    page.click("nav button[data-tab=audit]")
    page.wait_for_selector("#audit-table tr[data-event=rollout_aborted]")
    assert "api" in page.text_content("#audit-table tr[data-event=rollout_aborted]")
    # The canary devices install the pre-signed rollback (release 3, the stable bundle).
    offered = list(_get(f"{fleet.url}/v1/rollouts", READ)["current"]["offered"])
    page.click("nav button[data-tab=fleet]")
    page.fill("#device-filter", offered[0])
    expect(page.locator(f"#devices tr[data-device='{offered[0]}'] td").nth(2)).to_have_text("3", timeout=90_000)
    page.fill("#device-filter", "")
    page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
    page.click("nav button[data-tab=rollout]")
    page.screenshot(path=str(tmp_path / "console-rollout.png"), full_page=True)
    assert (tmp_path / "console.png").stat().st_size > 10_000
    assert not errors, errors
    # The CLI sees the same.
    status = cli(fleet, "rollout", "status", "--json", token=READ)
    cur = json.loads(status.stdout)["current"]
    assert cur["state"] == "aborted" and cur["result"] == "rolled_back"


def test_the_console_page_loads_nothing_from_elsewhere(fleet):
    with urllib.request.urlopen(f"{fleet.url}/console", timeout=5) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http://" not in html and "https://" not in html
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith(("/console/static/", "data:")) for s in srcs), srcs
    assert "<script>" not in html, "no inline script: the CSP forbids it"
