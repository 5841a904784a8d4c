"""The decision service as a member of the fleet: a real Mosquitto with mutual TLS, ingestion into
a store, the rollout controller, and replicas in their own processes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.ingest import IngestService, IngestSettings
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings, bucket
from cogbert_cloud.release.signing import create_release
from cogbert_edge import Bundle, DecideClient, load_bundle
from cogbert_edge.link.mqtt import LinkSettings, MqttLink
from tests.test_decide import CFG, Replica, make_site

FLEET = "plant"


def _lanes(n_canary: int, n_control: int, control_pct: int) -> tuple[list[str], list[str]]:
    """Lane ids that the controller's buckets put in the canary share and in the control cohort."""
    canary: list[str] = []
    control: list[str] = []
    for i in range(200):
        name = f"decide-c{i}"
        side = control if bucket(FLEET, name) >= 100 - control_pct else canary
        if len(side) < (n_control if side is control else n_canary):
            side.append(name)
    return canary, control


CANARY, CONTROL = _lanes(2, 2, 50)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("decide-fleet")
    site = make_site(root / "site", fleet=FLEET)
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    pki.issue_service("rollout")
    for lane in ["decide-a1", "decide-a2", "decide-b1", *CANARY, *CONTROL]:
        pki.issue_device(lane, fleet=FLEET)
    broker = LocalBroker(pki.root, root / "broker").start()
    store = open_store(f"file://{root / 'store'}")
    ingest = IngestService(IngestSettings(broker=broker.service_url, pki=pki.root, client_id="ingest-decide"),
                           store=store).start()
    yield {"root": root, "site": site, "pki": pki, "broker": broker, "store": store}
    ingest.stop()
    broker.stop()


def test_decisions_served_by_two_replicas_are_stored_exactly_once_with_their_log_probs(fleet):
    site, root = fleet["site"], fleet["root"]
    kw = {"broker": fleet["broker"].url, "pki": fleet["pki"].root, "telemetry_interval": 1.0}
    a = Replica(site, "decide-a1,decide-a2", root / "spool-a", **kw)
    b = Replica(site, "decide-b1", root / "spool-b", **kw)
    served: dict[tuple[str, int], tuple[float, float, float]] = {}
    try:
        c = DecideClient(a.url, site["token"])
        rng = np.random.default_rng(1)
        names = [c.start_session(f"stored-{i}") for i in range(6)]
        for step in range(25):
            replica = a if (step // 5) % 2 == 0 else b          # every session moves every 5 steps
            c.close()
            c.port = replica.port
            for n in names:
                d = c.act(n, rng.standard_normal(CFG.obs_dim))
                reward = float(rng.random())
                c.reward(n, reward)                              # joined where the decision was made
                served[(n, d.step)] = (d.log_prob, d.value, reward)
        for n in names:
            c.end_session(n)
    finally:
        a.stop()       # SIGTERM: drain, flush the logs, wait for the uploads' acknowledgements
        b.stop()
    ds = ExperienceDataset(fleet["store"], FLEET)
    deadline = time.monotonic() + 30
    while ds.stats()["transitions"] < len(served) and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = ds.stats()
    assert stats == {**stats, "transitions": len(served), "duplicates": 0, "gaps": 0}
    stored: dict[tuple[str, int], tuple[float, float, float]] = {}
    for fleet_, device in ds.index():
        for batch in ds.batches(fleet_, device):
            for row in range(batch.n):
                key = (batch.sessions[batch.session_idx[row]], int(batch.step[row]))
                assert key not in stored, f"{key} stored twice"
                assert batch.models[batch.model_idx[row]] == "m1"
                stored[key] = (float(batch.log_prob[row]), float(batch.value[row]), float(batch.reward[row]))
    assert stored.keys() == served.keys(), "every decision, and nothing else, is in the store"
    for key, (logp, value, reward) in served.items():
        assert stored[key] == pytest.approx((logp, value, reward), abs=1e-5), key
    # A session that moved carries its state in its first record on each replica: the trainer
    # can start a sequence there, so all of them are trainable.
    assert sum(len(x.reward) for x in ds.sequences(max_len=1000)) == len(served)


def _poison(raw: bytes) -> bytes:
    """A valid, signed model that has collapsed to action 0, as a diverged run can: only what
    its sessions earn shows it (the demo's broken release)."""
    b = load_bundle(raw)
    p = b.fp32_params()
    p["policy.weight"] = np.zeros_like(p["policy.weight"])
    p["policy.bias"] = np.where(np.arange(p["policy.bias"].size) == 0, 20.0, 0.0).astype(np.float32)
    return Bundle.create(b.config, p, model_id="m2-broken", parent=b.model_id).to_bytes()


def test_a_canary_on_session_cohorts_rolls_back_a_broken_release(fleet):
    site, root, store = fleet["site"], fleet["root"], fleet["store"]
    keys, stable = site["keys"], site["bundle"]
    registry = Registry(store)
    registry.add(1, stable, (site["root"] / "release.json").read_bytes(), state="stable")
    broken = _poison(stable)
    rollback = create_release(stable, keys, counter=3, model="cogbert", fleet=FLEET)
    registry.add(2, broken, create_release(broken, keys, counter=2, model="cogbert", fleet=FLEET),
                 rollback=rollback, parent_release=1)
    replica = Replica(site, ",".join(CANARY + CONTROL), root / "spool-canary", broker=fleet["broker"].url,
                      pki=fleet["pki"].root, telemetry_interval=0.5, trial_seconds=1, trial_decisions=50)
    link = MqttLink(LinkSettings.for_service(fleet["broker"].service_url, fleet["pki"].root, "rollout",
                                             client_id="rollout-decide")).start()
    view = FleetView()
    view.attach(link, FLEET)
    controller = RolloutController(RolloutSettings(fleet=FLEET, stages=(100,), control_pct=50, stage_seconds=4,
                                                   stage_timeout=60, report_timeout=30, min_devices=1,
                                                   min_decisions=100, notify_rate=50), registry, link, view)
    stop = threading.Event()
    models_seen: dict[str, set[str]] = {}
    errors: list[BaseException] = []

    def traffic() -> None:
        """Episodes of 8 decisions on 24 sessions; reward 1 for any action but 0 (the no-op)."""
        try:
            c = DecideClient(replica.url, site["token"])
            names = [c.start_session(f"cohort-{i}") for i in range(24)]
            rng = np.random.default_rng(2)
            k = 0
            while not stop.is_set():
                k += 1
                for n in names:
                    d = c.act(n, rng.standard_normal(CFG.obs_dim))
                    models_seen.setdefault(d.model, set()).add(n)
                    c.reward(n, 0.0 if d.action == 0 else 1.0, done=k % 8 == 0)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while len(view.snapshot()) < len(CANARY + CONTROL) and time.monotonic() < deadline:
            time.sleep(0.2)            # every lane has reported telemetry: the controller knows them
        assert len(view.snapshot()) >= len(CANARY + CONTROL), view.snapshot().keys()
        controller.start(2)
        deadline = time.monotonic() + 90
        while controller.status().get("state") == "running" and time.monotonic() < deadline:
            controller.tick()
            time.sleep(0.2)
        status = controller.status()
        assert status.get("state") == "aborted", status
        assert registry.get(2)["state"] == "rolled_back"
        assert any("reward" in r for r in status.get("reasons", [])), status.get("reasons")
        assert set(status["offered"]) == set(CANARY), "only canary lanes were offered the candidate"
        # Sessions on canary lanes ran the broken model, sessions on control lanes never did ...
        assert models_seen.get("m2-broken"), "canary sessions were served the candidate"
        # ... and after the rollback release every session is served the stable model again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            models_seen.clear()
            time.sleep(1.5)
            if set(models_seen) == {"m1"}:
                break
        assert set(models_seen) == {"m1"}, models_seen.keys()
        assert not errors, errors
    finally:
        stop.set()
        t.join(10)
        link.close()
        replica.stop()
