"""The connected-device SDK as a user meets it: the public names, the example application run as
its own process against a real broker and ingestion, and what it stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_cloud.data.ingest import IngestService, IngestSettings
from cogbert_cloud.data.store import open_store
from cogbert_cloud.fleet.broker import LocalBroker
from cogbert_cloud.fleet.pki import PKI
from cogbert_edge import (
    ActionSpace,
    Bundle,
    ConfigError,
    Device,
    DeviceSettings,
    ModelConfig,
    OutboxSettings,
    init_params,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdk")
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    pki.issue_device("press-1", fleet="plant")
    cfg = ModelConfig(obs_dim=6, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
    bundle = root / "model.safetensors"
    Bundle.create(cfg, init_params(cfg, 0, policy_gain=1.0)).save(bundle)
    broker = LocalBroker(pki.root, root / "broker").start()
    store = open_store(f"file://{root / 'store'}")
    ingest = IngestService(IngestSettings(broker=broker.service_url, pki=pki.root, client_id="ingest-sdk"),
                           store=store).start()
    yield {"root": root, "pki": pki, "bundle": bundle, "broker": broker, "store": store}
    ingest.stop()
    broker.stop()


def test_the_example_device_decides_reports_delayed_rewards_and_every_record_is_stored_once(site):
    steps, units, delay, episode = 150, 3, 2, 50
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "connected_device.py"), "--device-id", "press-1", "--fleet",
         "plant", "--broker", site["broker"].url, "--pki", str(site["pki"].root), "--bundle", str(site["bundle"]),
         "--spool", str(site["root"] / "spool"), "--units", str(units), "--steps", str(steps), "--rate", "500",
         "--episode", str(episode), "--reward-delay", str(delay)],
        capture_output=True, text=True, timeout=180, env={**os.environ, "COGBERT_BACKEND": "numpy"})
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["decisions"] == steps * units and out["logged"] == steps * units and out["drained"]
    assert out["backend"] == "numpy"             # COGBERT_BACKEND reaches the device's policy
    assert out["rewards"] == steps * units and out["late_rewards"] == 0

    ds = ExperienceDataset(site["store"], "plant")
    stats = ds.stats()
    assert stats == {**stats, "transitions": steps * units, "duplicates": 0, "gaps": 0, "devices": 1}
    seqs = list(ds.sequences(max_len=1000))
    # Each delayed reward reached the decision it was for, not the latest one: every decision
    # carries exactly one inspection's quality, and the sum over the store is what the device
    # reported.
    rewards = np.concatenate([s.reward for s in seqs])
    assert len(rewards) == steps * units
    assert np.isclose(rewards.sum(), out["reward_sum"], atol=1e-3)
    assert (rewards > 0).all() and (rewards <= 1.0 + 1e-6).all()
    # Episodes end where the example ends them: every `episode` decisions of a unit.
    assert {len(s.reward) for s in seqs} == {episode}
    assert all(s.truncated[-1] for s in seqs)


def test_device_settings_say_what_is_wrong(site, tmp_path):
    with pytest.raises(ConfigError, match="identity"):
        DeviceSettings(device_id="press-1", spool=tmp_path, bundle=site["bundle"])
    with pytest.raises(ConfigError, match="device id"):
        DeviceSettings(device_id="a/b", spool=tmp_path, bundle=site["bundle"], pki=site["pki"].root)
    with pytest.raises(ConfigError, match="for fleet 'plant', but the device is configured for fleet 'sim'"):
        Device(DeviceSettings(device_id="press-1", fleet="sim", spool=tmp_path, bundle=site["bundle"],
                              pki=site["pki"].root))
    with pytest.raises(ConfigError, match="invalid_obs"):
        DeviceSettings(device_id="press-1", spool=tmp_path, bundle=site["bundle"], pki=site["pki"].root,
                       invalid_obs="ignore")


def test_a_device_keeps_deciding_with_the_broker_down_and_its_settings_are_typed(site, tmp_path):
    # An unreachable broker: decisions go on, the outbox holds them, nothing is lost.
    s = DeviceSettings(device_id="press-1", fleet="plant", spool=tmp_path / "spool", bundle=site["bundle"],
                       pki=site["pki"].root,
                       broker="mqtts://localhost:9", backend="numpy", outbox=OutboxSettings(max_bytes=1 << 20))
    with Device(s) as dev:
        for t in range(200):
            d = dev.act("u", np.zeros(6, np.float32))
            assert d.session == "u" and d.step == t
        dev.flush()
        tel = dev.telemetry()
    assert tel.decisions == 200 and tel.outbox.last_seq == 200 and tel.outbox.acked_seq == 0
    assert tel.link != "connected"
    assert (tmp_path / "spool" / "outbox").is_dir()


@pytest.mark.parametrize("freeze", [True, False])
def test_a_started_device_takes_its_start_up_objects_out_of_later_garbage_collections(site, tmp_path, freeze):
    # A full collection over a started device's objects stalled a decision by 20-40 ms
    # (cogbert-bench swap: gc_full_collection_ms); the device freezes them unless told not to.
    import gc
    gc.unfreeze()
    s = DeviceSettings(device_id="press-1", fleet="plant", spool=tmp_path / "spool", bundle=site["bundle"],
                       pki=site["pki"].root, broker="mqtts://localhost:9", backend="numpy", freeze_gc=freeze)
    try:
        with Device(s) as dev:
            dev.act("u", np.zeros(6, np.float32))
            frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert (frozen > 1000) if freeze else (frozen == 0), frozen
