"""The continuous learner's fault-injection round: the gate is bypassed so that the canary is
what gets tested, and what the gate would have decided is recorded beside it, even when the
gate cannot judge at all."""

from __future__ import annotations

import pytest

from cogbert_cloud.data.store import open_store
from cogbert_cloud.errors import StoreError
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_cloud.release.signing import KeyStore, create_release
from cogbert_cloud.service.loop import ContinuousLearner, KeySigner, LoopSettings
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params, load_bundle

from .test_rollout import tel

CFG = ModelConfig(obs_dim=8, action=ActionSpace.of_discrete(3), encoder=(16,), hidden=16)


class _Trainer:
    def train(self, round_dir, init, data_url, steps):
        out = round_dir / "model.safetensors"
        Bundle.create(CFG, init_params(CFG, 1), model_id="cand", parent="stable").save(out)
        return out


def _learner(tmp_path, gate) -> tuple[ContinuousLearner, Registry]:
    # The stable release says how it was trained, as an exported one does.
    stable = Bundle.create(CFG, init_params(CFG, 0), model_id="stable",
                           extra={"x-train": '{"mode": "ppo", "steps": 400000}'}).to_bytes()
    keys = KeyStore.init(tmp_path / "keys")
    store = open_store(f"file://{tmp_path / 'store'}")
    reg = Registry(store)
    reg.add(1, stable, create_release(stable, keys, counter=1, model="m", fleet="f"), state="stable")
    fleet = FleetView()
    for i in range(4):
        fleet.on_telemetry(f"dev-{i}", tel(device=f"dev-{i}"), now=1000.0)
    ctl = RolloutController(RolloutSettings(fleet="f", stage_seconds=10, report_timeout=5, min_devices=2), reg, None,
                            fleet, clock=lambda: 1000.0)
    learner = ContinuousLearner(LoopSettings(fleet="f", model="m", store_url=store.url, workdir=tmp_path / "work"),
                                reg, ctl, _Trainer(), KeySigner(tmp_path / "keys", "m", "f"), gate=gate)
    return learner, reg


def _break(bundle: bytes) -> bytes:
    return Bundle.create(CFG, init_params(CFG, 2), model_id="broken").to_bytes()


def test_an_injected_fault_bypasses_the_gate_and_keeps_its_verdict(tmp_path):
    seen = []

    def gate(**kw):
        seen.append(kw["candidate"])
        return {"decision": "reject", "reasons": ["the candidate is worse"]}

    learner, reg = _learner(tmp_path, gate)
    res = learner.round(inject=_break)
    assert res["injected_fault"] and res["decision"] == "rollout_started"
    assert res["gate"]["decision"] == "promote"
    assert res["gate"]["bypassed"] == {"decision": "reject", "reasons": ["the candidate is worse"]}
    assert seen and load_bundle(seen[0]).model_id == "broken"     # it judged the broken model


def test_a_gate_that_cannot_judge_does_not_stop_the_fault_injection_round(tmp_path):
    def gate(**kw):
        raise StoreError("the store is unreachable")

    learner, _ = _learner(tmp_path, gate)
    res = learner.round(inject=_break)
    assert res["decision"] == "rollout_started"
    assert res["gate"]["bypassed"]["decision"] == "error"
    assert "StoreError: the store is unreachable" in res["gate"]["bypassed"]["reasons"][0]


def test_without_a_fault_a_gate_error_still_ends_the_round(tmp_path):
    # Only the bypassed gate is allowed to fail quietly: a real candidate needs a verdict.
    def gate(**kw):
        raise StoreError("the store is unreachable")

    learner, _ = _learner(tmp_path, gate)
    with pytest.raises(StoreError):
        learner.round()


def test_a_round_whose_trainer_returns_the_stable_release_records_no_training(tmp_path):
    # The demo's fault injection breaks a copy of the stable release: the release it makes must
    # not claim the stable release's training as its own.
    class Untrained:
        def train(self, round_dir, init, data_url, steps):
            return init

    learner, reg = _learner(tmp_path, lambda **kw: {"decision": "promote", "reasons": []})
    learner.trainer = Untrained()
    res = learner.round(inject=_break)
    assert res["train"] is None and not reg.get(res["release"])["train"]
