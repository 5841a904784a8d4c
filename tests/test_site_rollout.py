"""Site-consistent rollout and rollback with real processes: two sites of three agent devices each
(their own certificates, outboxes and update agents, each with its role), deciding all along on
the line, a real broker, and the rollout driven through it. A canary stage is a whole site; a
release that one role's agents reject rolls back the whole site, the agent that took it too."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.learn.envs.production_line import ProductionLineVecEnv
from cogbert_cloud.release.rollout.sites import SiteRelease, SiteRollout, _SiteState, canary_sites
from cogbert_cloud.release.signing import KeyStore, create_site_release
from cogbert_edge.errors import ConfigError, VerificationError
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params
from cogbert_edge.link.mqtt import Message
from cogbert_edge.update.trust import TrustedState
from cogbert_edge.wire.messages import StatusReport

from .fleet import service_link

FLEET = "plant"
SITES = {"lineA": {"a0": "head", "a1": "body", "a2": "body"},
         "lineB": {"b0": "head", "b1": "body", "b2": "body"}}


def _bundle(seed: int, obs_dim: int = 12) -> bytes:
    cfg = ModelConfig(obs_dim=obs_dim, action=ActionSpace.of_discrete(3), encoder=(16,), hidden=16)
    params = init_params(cfg, seed, policy_gain=1.0)
    params["obs_norm.mean"] = np.zeros(obs_dim, np.float32)
    params["obs_norm.std"] = np.ones(obs_dim, np.float32)
    return Bundle.create(cfg, params).to_bytes()


def _model_id(data: bytes) -> str:
    from cogbert_edge.inference.bundle import load_bundle
    return load_bundle(data).model_id


def test_a_site_release_is_one_manifest_and_each_role_gets_its_own_bundle(tmp_path):
    keys = KeyStore.init(tmp_path / "keys")
    head, body = _bundle(1), _bundle(2)
    m = create_site_release({"head": head, "body": body}, keys, counter=2, model="cogbert", fleet=FLEET)
    import datetime as dt
    trust = TrustedState(keys.root_bytes(), now=dt.datetime.now(dt.timezone.utc))
    kw: dict[str, Any] = dict(model="cogbert", fleet=FLEET, highest_counter=1, sdk_format_version=1,
                              sdk_version=(9, 9, 9))
    r_head = trust.verify_site_release(m, role="head", **kw)
    r_body = trust.verify_site_release(m, role="body", **kw)
    TrustedState.verify_bundle(r_head, head)
    TrustedState.verify_bundle(r_body, body)
    with pytest.raises(VerificationError):
        TrustedState.verify_bundle(r_head, body)        # the head may not install the body's bundle
    with pytest.raises(VerificationError, match="no bundle for role"):
        trust.verify_site_release(m, role="tail", **kw)
    with pytest.raises(VerificationError):
        trust.verify_release(m, model="cogbert", fleet=FLEET, highest_counter=1, sdk_format_version=1,
                             sdk_version=(9, 9, 9))    # a single-model device refuses a site release
    tampered = m.replace(b'"head"', b'"hea2"')
    with pytest.raises(VerificationError):
        trust.verify_site_release(tampered, role="hea2", **kw)
    with pytest.raises(VerificationError, match="rollback"):
        trust.verify_site_release(m, role="head", **{**kw, "highest_counter": 2})
    assert canary_sites(["s1", "s2", "s3", "s4"], 0.25) == ["s1"]
    assert canary_sites(["s1", "s2", "s3"], 0.5) == ["s1", "s2"]
    with pytest.raises(ConfigError):
        canary_sites(["s1"], 0.0)


class Plant(threading.Thread):
    """Both lines, stepping their three agent processes over and over (as the stations would)."""

    def __init__(self, procs: dict[str, list[subprocess.Popen]]) -> None:
        super().__init__(daemon=True)
        self.procs = procs
        self.models: dict[str, str] = {}
        self.steps = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            envs = {s: ProductionLineVecEnv(1) for s in self.procs}
            obs = {s: envs[s].reset(seed=i)[0] for i, s in enumerate(self.procs)}
            t = 0
            while not self.stop.is_set():
                for s, procs in self.procs.items():
                    if t % envs[s].episode_length == 0 and t:
                        obs[s] = envs[s].reset()[0]
                    step = t % envs[s].episode_length
                    for k, p in enumerate(procs):
                        assert p.stdin is not None
                        p.stdin.write(json.dumps({"step": step, "obs": obs[s][0, k].tolist(),
                                                  "session": f"{s}-{t // envs[s].episode_length}"}) + "\n")
                        p.stdin.flush()
                    res = []
                    for p in procs:
                        assert p.stdout is not None
                        res.append(json.loads(p.stdout.readline()))
                    for d, r in zip(SITES[s], res, strict=True):
                        self.models[d] = r["model"]
                    obs[s], *_ = envs[s].step(np.array([[r["action"] for r in res]]))
                t += 1
                self.steps = t
        except BaseException as e:  # surfaced by the test
            self.error = e


def test_a_counter_less_rejection_counts_only_for_the_offer_whose_manifest_it_names(tmp_path):
    # An agent reports a manifest it could not verify without a counter. Arriving after the site's
    # next offer, a late rejection of the previous one must not fail the new one.
    keys = KeyStore.init(tmp_path / "keys")
    v2 = {"head": _bundle(21), "body": _bundle(22)}
    old = SiteRelease(3, create_site_release(v2, keys, counter=3, model="cogbert", fleet=FLEET), v2)
    new = SiteRelease(4, create_site_release(v2, keys, counter=4, model="cogbert", fleet=FLEET), v2)
    rollout = SiteRollout(None, FLEET, SITES)  # type: ignore[arg-type]  # no offers are sent here
    with rollout._lock:
        rollout.state["lineA"] = _SiteState(counter=4, release=new, offered_at=time.time() - 1,
                                            manifest_sha256=hashlib.sha256(new.manifest).hexdigest())

    def report(manifest: bytes | None) -> Message:
        r = StatusReport.parse("rejected:bad_signature", device="a2", time=time.time(),
                               manifest=hashlib.sha256(manifest).hexdigest() if manifest else "")
        return Message(f"cogbert/v1/{FLEET}/a2/status", r.encode(), 1, False, None)

    rollout._on_status(report(old.manifest))
    assert rollout.verdict("lineA") == "pending" and rollout.reports("lineA") == {}
    rollout._on_status(report(new.manifest))
    assert rollout.verdict("lineA") == "failed" and rollout.reports("lineA")["a2"].reason == "bad_signature"
    # An agent that sends no hash: a rejection after the offer is taken as the offer's.
    with rollout._lock:
        rollout.state["lineA"].reports.clear()
    rollout._on_status(report(None))
    assert rollout.verdict("lineA") == "failed"


def test_a_canary_is_a_whole_site_and_a_failed_release_rolls_back_the_whole_site(tmp_path):
    pki = PKI.init(tmp_path / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("rollout")
    for site, members in SITES.items():
        for d in members:
            pki.issue_device(d, fleet=FLEET, site=site)
    keys = KeyStore.init(tmp_path / "keys")
    factory = _bundle(0)
    (tmp_path / "factory.safetensors").write_bytes(factory)
    v2 = {"head": _bundle(21), "body": _bundle(22)}
    bad = {"head": _bundle(31), "body": _bundle(32, obs_dim=13)}      # the body role cannot run it
    r2 = SiteRelease(2, create_site_release(v2, keys, counter=2, model="cogbert", fleet=FLEET), v2)
    r3 = SiteRelease(3, create_site_release(bad, keys, counter=3, model="cogbert", fleet=FLEET), bad)
    r4 = SiteRelease(4, create_site_release(v2, keys, counter=4, model="cogbert", fleet=FLEET), v2)  # rollback
    broker = LocalBroker(pki.root, tmp_path / "broker").start()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COGBERT_LOG_LEVEL": "warning"}
    procs: dict[str, list[subprocess.Popen]] = {}
    for site, members in SITES.items():
        procs[site] = [subprocess.Popen(
            [sys.executable, "-m", "cogbert_edge.site", "--device", d, "--fleet", FLEET, "--site", site, "--members",
             ",".join(members), "--coordinator", "nobody", "--mode", "decentralized", "--broker", broker.url,
             "--pki", str(pki.root), "--bundle", str(tmp_path / "factory.safetensors"), "--deadline-ms", "300",
             "--spool", str(tmp_path / f"spool-{d}"), "--trust-root", str(keys.root / "root.json"), "--role", role,
             "--trial-decisions", "20", "--drain-timeout", "5"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for d, role in members.items()]
    plant = Plant(procs)
    link = service_link(broker, pki, "rollout")
    try:
        for ps in procs.values():
            for p in ps:
                assert p.stdout is not None and json.loads(p.stdout.readline())["event"] == "agent_ready"
        link.wait_connected(10)
        rollout = SiteRollout(link, FLEET, SITES).start()
        plant.start()
        # Every agent has decided once before the rollout starts: a first step can take longer
        # than the canary's install, and the untouched site must be seen running its factory model.
        wait_for(lambda: plant.steps > 0, plant)
        canary = canary_sites(list(SITES), 0.5)
        assert canary == ["lineA"]
        # Stage 1: the canary site installs release 2, every agent its own role's bundle ...
        assert rollout.stage(canary, r2, rollback=r4, timeout=90) == {"lineA": "installed"}
        wait_for(lambda: all(plant.models.get(d) == _model_id(v2[r]) for d, r in SITES["lineA"].items()), plant)
        # ... and the other site is untouched.
        assert all(plant.models[d] == _model_id(factory) for d in SITES["lineB"])
        assert rollout.reports("lineB") == {}
        # Stage 2: release 3's body bundle does not fit: the body agents reject it, the head took it,
        # and the whole site goes back (to the pre-signed rollback, release 4 = release 2's bundles).
        assert rollout.stage(["lineA"], r3, rollback=r4, timeout=90) == {"lineA": "rolled_back"}
        assert rollout.verdict("lineA") == "installed", rollout.reports("lineA")
        reps = rollout.reports("lineA")
        assert set(reps) == set(SITES["lineA"]) and all(r.counter == 4 and r.installed for r in reps.values())
        wait_for(lambda: all(plant.models.get(d) == _model_id(v2[r]) for d, r in SITES["lineA"].items()), plant)
        assert [a["action"] for a in rollout.audit] == ["offer", "offer", "rollback", "offer"]
        assert all(plant.models[d] == _model_id(factory) for d in SITES["lineB"])
        steps = plant.steps
        time.sleep(1.0)
        assert plant.steps > steps, "the agents kept deciding through every install and rollback"
        assert plant.error is None, plant.error
    finally:
        plant.stop.set()
        plant.join(20)
        link.close()
        for ps in procs.values():
            for p in ps:
                if p.stdin:
                    p.stdin.close()
        for ps in procs.values():
            for p in ps:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.stop()


def wait_for(cond, plant: Plant, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert plant.error is None, plant.error
        assert time.monotonic() < deadline, f"timed out; models: {plant.models}"
        time.sleep(0.05)
