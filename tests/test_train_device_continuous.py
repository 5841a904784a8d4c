"""Continuous actions through the real fleet path: simulated devices (the Device SDK over
mutual-TLS MQTT to Mosquitto) run a bounded Pendulum policy, ingestion stores what they logged,
and V-trace reads it back: the logged actions lie inside the bounds, and the behaviour
log-probabilities the devices logged are the densities the learner computes for those same
actions (importance ratios of 1 for the model that ran)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

from cogbert_cloud.data.dataset import ExperienceDataset  # noqa: E402
from cogbert_cloud.data.store import open_store  # noqa: E402
from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker  # noqa: E402
from cogbert_cloud.fleet.pki import PKI  # noqa: E402
from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer  # noqa: E402
from cogbert_cloud.learn.train.vtrace import VTraceConfig, VTraceTrainer  # noqa: E402

from .test_pipeline import Ingest  # noqa: E402

BIN = Path(sys.executable).parent


def test_simulated_devices_log_bounded_continuous_actions_with_their_density(tmp_path):
    pki = PKI.init(tmp_path / "pki")
    pki.issue_server(["localhost"])
    pki.issue_service("ingest")
    for i in range(2):
        pki.issue_device(f"sim-{i:04d}", fleet="plant")
    bundle = PPOTrainer(PPOConfig(env="Pendulum-v1", num_envs=2, encoder=(16,), hidden=16)).bundle()
    bundle.save(tmp_path / "model.safetensors")
    broker = LocalBroker(pki.root, tmp_path / "broker", config=BrokerConfig(plugin_in_confdir=False)).start()
    world = {"root": tmp_path, "pki": pki}
    store = f"file://{tmp_path / 'store'}"
    ingest = Ingest(world, broker, store, "c").start()
    try:
        proc = subprocess.run([str(BIN / "cogbert"), "--log-level", "WARNING", "device", "simulate", "--devices", "2",
                               "--steps", "800", "--broker", broker.url, "--pki", str(pki.root), "--spool",
                               str(tmp_path / "spool"), "--bundle", str(tmp_path / "model.safetensors"), "--fleet",
                               "plant", "--env", "Pendulum-v1", "--ack-timeout", "3", "--drain-timeout", "120"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads(proc.stdout)
        assert summary["logged"] == 1600 and summary["all_drained"], summary
    finally:
        ingest.stop()
        broker.stop()
    seqs = list(ExperienceDataset(open_store(store), "plant").sequences())
    actions = np.concatenate([s.action for s in seqs])
    assert actions.shape == (1600, 1) and (np.abs(actions) < 2.0).all() and actions.std() > 0.2
    trainer = VTraceTrainer(bundle, VTraceConfig(lr=1e-9, epochs=1, burn_in=2))
    info = trainer.train(seqs, progress=False)
    assert info["transitions"] == 1600
    assert abs(info["mean_ratio"] - 1.0) < 1e-3, info
