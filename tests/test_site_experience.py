"""A site's experience, end to end with real processes: three agent devices (each its own outbox and
certificate) and a coordinator run two episodes of the line through a real broker; a real ingestion
process stores their logs (and is killed -9 and restarted mid-run); the join rebuilds every joint
step of the site exactly once, with the rewards the plant paid and the actions the agents proposed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.learn.envs.production_line import ProductionLineConfig, ProductionLineVecEnv
from cogbert_cloud.learn.marl.join import join_site
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params

from .helpers import log_tail, spawn_logged

BIN = Path(sys.executable).parent
FLEET, SITE = "plant", "lineA"
MEMBERS = ["s0", "s1", "s2"]
T = 30


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COGBERT_LOG_LEVEL": "warning"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-exp")
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    for d in MEMBERS:
        pki.issue_device(d, fleet=FLEET, site=SITE)
    pki.issue_device("coord", fleet=FLEET, site=SITE, site_role="coordinator")
    broker = LocalBroker(pki.root, root / "broker").start()
    cfg = ModelConfig(obs_dim=12, action=ActionSpace.of_discrete(3), encoder=(16,), hidden=16)
    params = init_params(cfg, 5, policy_gain=1.0)
    params["obs_norm.mean"] = np.zeros(12, np.float32)
    params["obs_norm.std"] = np.ones(12, np.float32)
    Bundle.create(cfg, params).save(root / "role.safetensors")
    yield {"root": root, "pki": pki, "broker": broker, "bundle": root / "role.safetensors"}
    broker.stop()


class Ingest:
    def __init__(self, world, store: str) -> None:
        self.stats = world["root"] / "ingest-stats.json"
        self.log = world["root"] / "ingest.log"
        self.args = [str(BIN / "cogbert"), "--log-level", "WARNING", "cloud", "ingest", "--broker",
                     world["broker"].service_url, "--pki", str(world["pki"].root), "--store", store,
                     "--client-id", "ingest-site", "--stats-file", str(self.stats), "--stats-interval", "0.2"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Ingest:
        self.stats.unlink(missing_ok=True)
        self.proc = spawn_logged(self.args, self.log, env=_env(), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.stats.exists():
            assert self.proc.poll() is None, log_tail(self.log)
            assert time.monotonic() < deadline, "ingest did not start"
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def test_joined_site_experience_reaches_the_trainer_exactly_once(world):
    store = f"file://{world['root'] / 'store'}"
    ingest = Ingest(world, store).start()
    b, pki = world["broker"], world["pki"]
    coord = subprocess.Popen([sys.executable, "-m", "cogbert_cloud.service.coordinator", "--fleet", FLEET, "--site",
                              SITE, "--device", "coord", "--members", ",".join(MEMBERS), "--broker", b.url, "--pki",
                              str(pki.root), "--deadline-ms", "200"], stdout=subprocess.PIPE, text=True, env=_env())
    agents = [subprocess.Popen([sys.executable, "-m", "cogbert_edge.site", "--device", d, "--fleet", FLEET, "--site",
                                SITE, "--members", ",".join(MEMBERS), "--coordinator", "coord", "--broker", b.url,
                                "--pki", str(pki.root), "--bundle", str(world["bundle"]), "--deadline-ms", "400",
                                "--seed", str(k), "--spool", str(world["root"] / f"spool-{d}"),
                                "--drain-timeout", "90"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
              for k, d in enumerate(MEMBERS)]
    paid: dict[tuple[str, int], float] = {}
    proposed: dict[tuple[str, int], list[int]] = {}
    try:
        assert coord.stdout is not None and json.loads(coord.stdout.readline())["event"] == "coordinator_ready"
        for p in agents:
            assert p.stdout is not None and json.loads(p.stdout.readline())["event"] == "agent_ready"

        def send(p: subprocess.Popen, msg: dict) -> None:
            assert p.stdin is not None
            p.stdin.write(json.dumps(msg) + "\n")
            p.stdin.flush()

        env = ProductionLineVecEnv(1, config=ProductionLineConfig(episode_length=T))
        for episode in range(2):
            session = f"{SITE}-ep{episode}"
            obs, _ = env.reset(seed=100 + episode)
            for t in range(T):
                for k, p in enumerate(agents):
                    send(p, {"step": t, "obs": obs[0, k].tolist(), "session": session})
                res = []
                for p in agents:
                    assert p.stdout is not None
                    res.append(json.loads(p.stdout.readline()))
                assert all(r["logged_step"] == t for r in res), res
                obs, _, reward, _, done, _ = env.step(np.array([[r["action"] for r in res]]))
                paid[(session, t)] = float(reward[0])
                proposed[(session, t)] = [r["proposed"] for r in res]
                for p in agents:
                    send(p, {"reward": float(reward[0]), "session": session, "step": t, "truncated": bool(done[0])})
                if episode == 0 and t == T // 2:
                    ingest.kill()           # kill -9 of ingestion mid-run ...
                    time.sleep(0.3)
                    ingest.start()          # ... and its restart
        final = []
        for p in agents:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.close()
            final.append(json.loads(p.stdout.read().strip().splitlines()[-1])["metrics"])
            p.wait(30)
    finally:
        for p in agents:
            if p.poll() is None:
                p.kill()
        coord.terminate()
        coord.wait(10)
        ingest.stop()
    assert all(f["drained"] and f["logged"] == 2 * T for f in final), final
    ds = ExperienceDataset(open_store(store), FLEET)
    stats = ds.stats()
    assert (stats["transitions"], stats["devices"], stats["duplicates"], stats["missing"]) == (3 * 2 * T, 3, 0, 0)
    rep = join_site(ds, FLEET, SITE, MEMBERS, episode_length=T)
    assert (rep.joint_steps, rep.incomplete, rep.duplicates) == (2 * T, 0, 0)
    assert rep.records == {m: 2 * T for m in MEMBERS}
    assert [e.session for e in rep.episodes] == [f"{SITE}-ep0", f"{SITE}-ep1"]
    for e in rep.episodes:
        assert e.steps.tolist() == list(range(T))
        assert e.obs.shape == (T, 3, 9) and e.state.shape == (T, 28)
        np.testing.assert_allclose(e.reward[:, 0], [paid[(e.session, t)] for t in range(T)], rtol=1e-6)
        assert (e.reward == e.reward[:, :1]).all()        # the team reward, at every agent
        assert e.actions.tolist() == [proposed[(e.session, t)] for t in range(T)]
        assert e.done.tolist() == [False] * (T - 1) + [True]
        assert np.all(e.log_prob <= 0) and np.all(np.isfinite(e.log_prob))
