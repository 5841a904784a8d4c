"""The rollout controller's decisions: promotion, an abort for each failure kind, timeouts,
missing metrics, the notification cap, and the registry and audit trail it leaves."""

from __future__ import annotations

import numpy as np
import pytest

from cogbert_cloud.data.store import open_store
from cogbert_cloud.release.registry import AuditLog, Registry, RegistryError
from cogbert_cloud.release.rollout import (
    DeviceRecord,
    FleetView,
    ReceivedStatus,
    RolloutConflict,
    RolloutController,
    RolloutSettings,
    analyze,
    bucket,
    welch_p_less,
)
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params
from cogbert_edge.wire.messages import StatusReport, Telemetry

S = RolloutSettings(fleet="f", stages=(50, 100), control_pct=30, stage_seconds=10, stage_timeout=100,
                    report_timeout=20, min_devices=2, min_decisions=100)


def tel(decisions=500, errors=0, nonfinite=0, reward=250.0, lat=100.0, reward_count=None, **kw):
    return Telemetry(device=kw.pop("device", "d"), model=kw.pop("model", "m"), time=0.0, decisions=decisions,
                     errors=errors, nonfinite=nonfinite, reward_sum=reward,
                     reward_count=decisions if reward_count is None else reward_count, latency_p95_us=lat, **kw)


def committed(status="committed", counter=7, received=2.0):
    return ReceivedStatus(StatusReport.parse(status, counter=counter), received)


def world(canary_status="committed", canary_tel=None, control_tel=None, n_canary=3, n_control=3, now=50.0):
    devices, canary = {}, {}
    for i in range(n_canary):
        d = f"c{i}"
        canary[d] = 1.0
        devices[d] = DeviceRecord(statuses=[committed(canary_status)] if canary_status else [],
                                  telemetry=canary_tel(i) if callable(canary_tel) else (canary_tel or tel()),
                                  last_seen=now)
    control = []
    for i in range(n_control):
        d = f"k{i}"
        control.append(d)
        devices[d] = DeviceRecord(telemetry=control_tel(i) if callable(control_tel) else (control_tel or tel()),
                                  last_seen=now)
    return dict(canary=canary, control=control, devices=devices, baseline={}, candidate_counter=7,
                stage_started=0.0, now=now)


def test_healthy_canaries_pass():
    r = analyze(S, **world(canary_tel=lambda i: tel(reward=250 + i), control_tel=lambda i: tel(reward=250 - i)))
    assert r.verdict == "pass", r


@pytest.mark.parametrize("case,kw,word", [
    ("install failures", dict(canary_status="rolled_back:nan_outputs"), "install_failures"),
    ("rejected installs", dict(canary_status="rejected:hash_mismatch"), "install_failures"),
    ("errors", dict(canary_tel=tel(errors=50)), "error_rate"),
    ("NaN outputs", dict(canary_tel=tel(nonfinite=5)), "nan_rate"),
    ("latency", dict(canary_tel=tel(lat=5000.0)), "latency"),
    ("worse reward", dict(canary_tel=lambda i: tel(reward=100 + i), control_tel=lambda i: tel(reward=250 + i)),
     "reward"),
])
def test_each_failure_kind_aborts(case, kw, word):
    r = analyze(S, **world(**kw))
    assert r.verdict == "abort" and any(x.startswith(word) for x in r.reasons), (case, r)


def test_devices_that_never_report_count_as_failures_after_the_timeout():
    w = world(canary_status=None, now=50.0)             # offered at t=1, silent until t=50 > 20
    r = analyze(S, **w)
    assert r.verdict == "abort" and r.reasons[0].startswith("timeout")
    w = world(canary_status=None, now=10.0)             # still within the report timeout: wait
    assert analyze(S, **w).verdict == "wait"


def test_missing_metrics_never_count_as_success():
    w = world()
    for d in w["canary"]:
        w["devices"][d].telemetry = None                  # installed, but no telemetry at all
    assert analyze(S, **w).verdict == "wait"
    w["now"] = 150.0                                      # and past the stage timeout: abort
    r = analyze(S, **w)
    assert r.verdict == "abort" and r.reasons[0].startswith("insufficient_data")
    stale = world()
    for d in stale["canary"]:
        stale["devices"][d].last_seen = -5.0              # reported, but only before the stage began
    assert analyze(S, **stale).verdict == "wait"


def test_a_minimum_of_devices_and_decisions_before_any_decision():
    assert analyze(S, **world(canary_tel=tel(decisions=20), control_tel=tel(decisions=20))).verdict == "wait"
    assert analyze(S, **world(n_control=1)).verdict == "wait"


def test_welch_test():
    assert welch_p_less([1, 1.1, 0.9, 1.05], [2, 2.1, 1.9, 2.05]) < 0.001
    assert welch_p_less([2, 2.1, 1.9], [1, 1.1, 0.9]) > 0.99
    assert 0.3 < welch_p_less([1, 2, 3], [1.1, 2.1, 2.9]) < 0.7
    assert welch_p_less([1], [2, 3]) == 1.0


def test_the_reward_test_uses_every_telemetry_interval_of_small_cohorts():
    # Two canaries against two controls, each reporting every second for 6 s. The canaries
    # earn 0.45 less a step. Per-device means alone (Welch with ~2 degrees of freedom) cannot
    # tell at 5 %; the 12 against 12 intervals can.
    rng = np.random.default_rng(3)
    fleet = FleetView()
    for d, level in (("c0", -1.0), ("c1", -0.9), ("k0", -0.5), ("k1", -0.6)):
        total, count = 0.0, 0
        for t in range(7):
            fleet.on_telemetry(d, tel(decisions=count, reward=total, reward_count=count), now=float(t))
            total += 150 * (level + rng.normal(0, 0.15))
            count += 150
    devices = fleet.snapshot()
    means = {d: devices[d].telemetry.reward_sum / devices[d].telemetry.reward_count for d in devices}
    assert welch_p_less([means["c0"], means["c1"]], [means["k0"], means["k1"]]) > 0.05
    r = analyze(S, canary={"c0": 0.0, "c1": 0.0}, control=["k0", "k1"],
                devices={d: DeviceRecord(v.telemetry, v.last_seen, [committed(received=1.0)], v.rewards)
                         for d, v in devices.items()},
                baseline={}, candidate_counter=7, stage_started=0.0, now=6.0)
    assert r.verdict == "abort" and any(x.startswith("reward") for x in r.reasons), r
    assert r.metrics["reward_intervals_canary"] == 12 and r.metrics["reward_intervals_control"] == 12


def test_cohorts_are_deterministic_and_spread():
    b = [bucket("f", f"dev-{i}") for i in range(1000)]
    assert b == [bucket("f", f"dev-{i}") for i in range(1000)]
    assert 0 <= min(b) and max(b) < 100 and 40 < sum(x < 50 for x in b) / 10 < 60


# -- the controller with a registry -----------------------------------------------------------


def small_bundle(seed: int) -> bytes:
    cfg = ModelConfig(obs_dim=4, action=ActionSpace.of_discrete(2), encoder=(8,), hidden=8)
    return Bundle.create(cfg, init_params(cfg, seed), model_id=f"m{seed}").to_bytes()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def setup(tmp_path):
    store = open_store(f"file://{tmp_path}")
    reg = Registry(store)
    reg.add(1, small_bundle(1), b"manifest-1", state="stable")
    reg.add(2, small_bundle(2), b"manifest-2", rollback=b"rollback-3", parent_release=1)
    fleet, clock = FleetView(), Clock()
    for i in range(10):
        fleet.on_telemetry(f"dev-{i}", tel(decisions=0, reward=0.0), now=clock.t)
    ctl = RolloutController(RolloutSettings(fleet="f", stages=(30, 100), control_pct=30, stage_seconds=5,
                                            report_timeout=30, min_devices=2, min_decisions=100, notify_rate=4),
                            reg, None, fleet, clock=clock)
    return reg, fleet, clock, ctl


def report(fleet, clock, ctl, *, status="committed", reward=1.0, decisions=300):
    """Every device reports another ``decisions`` decisions (telemetry counters accumulate)."""
    for d, v in fleet.snapshot().items():
        offered = d in ctl.rollout.offered
        if offered and status:
            fleet.on_status(d, StatusReport.parse(status, counter=ctl.rollout.candidate), now=clock.t)
        t = v.telemetry
        n = (t.decisions if t else 0) + decisions
        r = (t.reward_sum if t else 0.0) + (reward if offered else 1.0) * decisions
        fleet.on_telemetry(d, tel(decisions=n, reward=r, reward_count=n), now=clock.t)


def run_stages(fleet, clock, ctl, **kw):
    for _ in range(30):
        clock.t += 1
        ctl.tick()
        report(fleet, clock, ctl, **kw)
        if ctl.rollout.state != "running":
            break


def test_a_good_candidate_is_promoted_and_the_old_stable_retired(setup):
    reg, fleet, clock, ctl = setup
    ctl.start(2)
    run_stages(fleet, clock, ctl)
    assert ctl.rollout.state == "promoted"
    assert reg.get(2)["state"] == "stable" and reg.get(1)["state"] == "retired"
    control = [d for d in fleet.snapshot() if bucket("f", d) >= 70]
    assert not set(control) & set(ctl.rollout.offered), "the control cohort stays on the stable release"
    events = [e["event"] for e in reg.audit.entries()]
    assert events.index("rollout_started") < events.index("stage_analysed") < events.index("rollout_promoted")
    assert events.count("release_state") == 3   # candidate -> canary, old stable -> retired, canary -> stable


def test_a_bad_candidate_is_rolled_back_by_the_pre_signed_higher_counter_release(setup):
    reg, fleet, clock, ctl = setup
    published = []
    ctl._publish = lambda manifest, key, device: published.append((manifest, key, device))
    ctl.start(2)
    run_stages(fleet, clock, ctl, status="rolled_back:nan_outputs")
    assert ctl.rollout.state == "aborted" and reg.get(2)["state"] == "rolled_back"
    rollbacks = [p for p in published if p[0] == b"rollback-3"]
    assert rollbacks and all(k == "releases/1/model.safetensors" for _, k, _ in rollbacks)
    assert (b"rollback-3", "releases/1/model.safetensors", None) in rollbacks, "fleet-wide as well"
    assert reg.next_counter() == 4, "the rollback's counter is taken"
    assert "rollout_aborted" in [e["event"] for e in reg.audit.entries()]


def test_notifications_never_exceed_their_rate_cap(setup):
    reg, fleet, clock, ctl = setup
    for i in range(10, 40):
        fleet.on_telemetry(f"dev-{i}", tel(), now=clock.t)
    ctl.s.stages = (100,)
    ctl.start(2)
    ctl.tick()
    assert len(ctl.rollout.offered) <= 4
    clock.t += 0.5
    ctl.tick()
    assert len(ctl.rollout.offered) <= 6


def test_operator_pause_resume_abort_and_illegal_transitions(setup):
    reg, fleet, clock, ctl = setup
    ctl.start(2, actor="alice")
    ctl.pause(actor="alice")
    clock.t += 100
    ctl.tick()
    assert ctl.rollout.state == "paused" and not ctl.rollout.timeline
    ctl.resume(actor="alice")
    ctl.abort("operator says no", actor="alice")
    assert reg.get(2)["state"] == "rolled_back"
    with pytest.raises(RolloutConflict):
        ctl.abort()
    with pytest.raises(RegistryError):
        reg.set_state(2, "stable")
    assert any(e.get("actor") == "alice" for e in reg.audit.entries())


def test_audit_log_is_append_only(tmp_path):
    store = open_store(f"file://{tmp_path}")
    log = AuditLog(store)
    for i in range(5):
        log.record("e", i=i)
    assert [e["i"] for e in log.entries()] == list(range(5))


def test_offers_carry_the_root_chain_the_signing_service_published(tmp_path):
    # The signer (which holds the keys) puts the public root versions in the store; the
    # controller (which holds none) sends them with every offer, so a device that missed two
    # root rotations walks them and then accepts a release signed by the newest release key.
    import datetime as dt

    from cogbert_cloud.release.signing import KeyStore
    from cogbert_cloud.service.serve import sign_requests
    from cogbert_edge.update.trust import TrustedState
    from cogbert_edge.wire.messages import decode_release_message

    keys = KeyStore.init(tmp_path / "keys")
    factory_root = keys.root_bytes()
    keys.rotate(root=True)
    keys.rotate(root=True)
    store = open_store(f"file://{tmp_path / 'store'}")
    reg = Registry(store)
    reg.add(1, small_bundle(1), b"manifest-1", state="stable")
    bundle = small_bundle(2)
    store.put("signing/bundles/2.safetensors", bundle)
    store.put("signing/requests/2.json", b'{"counter": 2}')
    assert sign_requests(store, tmp_path / "keys", model="m", fleet="f") == 1
    manifest = store.get("signing/done/2.json")
    reg.add(2, bundle, manifest, rollback=b"rollback-3", parent_release=1)

    sent = []

    class Link:
        def publish(self, topic, payload, *, qos=1, retain=False, properties=None):
            sent.append(decode_release_message(payload))

    fleet, clock = FleetView(), Clock()
    for i in range(10):
        fleet.on_telemetry(f"dev-{i}", tel(decisions=0, reward=0.0), now=clock.t)
    ctl = RolloutController(RolloutSettings(fleet="f", stages=(100,), control_pct=30, min_devices=2, notify_rate=100),
                            reg, Link(), fleet, clock=clock)
    ctl.start(2)
    clock.t += 1
    ctl.tick()
    assert sent and all(len(m.root_chain) == 2 for m in sent)
    device = TrustedState(factory_root, now=dt.datetime.now(dt.timezone.utc))
    assert device.update_root_chain(list(sent[0].root_chain)) == 2 and device.root.version == 3
    release = device.verify_release(sent[0].manifest, model="m", fleet="f", highest_counter=1,
                                    sdk_format_version=1, sdk_version=(99,))
    assert release.counter == 2
