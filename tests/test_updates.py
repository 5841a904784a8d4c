"""Signed releases and the update agent: one test per attack or failure, named after it."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cogbert_cloud.release.signing import KeyStore, create_release
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params
from cogbert_edge.update.agent import STEPS, UpdateAgent, UpdateSettings, golden_outputs
from cogbert_edge.update.trust import TrustedState, VerificationError, sign
from cogbert_edge.wire.messages import StatusReport

CFG = ModelConfig(obs_dim=12, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)


def make_bundle(seed: int, *, config: ModelConfig = CFG, golden: bool = True, poison: bool = False) -> bytes:
    p = init_params(config, seed, policy_gain=1.0)
    if poison:      # finite weights whose outputs overflow: NaN/Inf at run time
        p["encoder.0.weight"] = np.full_like(p["encoder.0.weight"], 3e38)
    b = Bundle.create(config, p, model_id=f"model-{seed}", created_at="2026-11-01T00:00:00Z")
    if golden:
        b = Bundle.create(config, p, model_id=f"model-{seed}", created_at="2026-11-01T00:00:00Z",
                          extra={"x-golden": json.dumps(golden_outputs(b))})
    return b.to_bytes()


class Harness:
    """An update agent with a decision loop, as a device runs it (without the network)."""

    def __init__(self, tmp: Path, keys: KeyStore, **settings) -> None:
        self.tmp, self.keys = tmp, keys
        self.factory = tmp / "factory.safetensors"
        if not self.factory.exists():
            self.factory.write_bytes(make_bundle(0))
        self.settings = dict(trial_decisions=20, trial_seconds=0.0, model="chain", fleet="plant", **settings)
        self.boot()

    def boot(self) -> None:
        self.agent = UpdateAgent(UpdateSettings(self.tmp / "update", **self.settings), self.keys.root_bytes(),
                                 factory_bundle=self.factory, backend="numpy")
        self.policy, self.note = self.agent.boot()
        self.statuses: list[StatusReport] = []
        self.agent.attach(swap=self._swap, report=self.statuses.append)

    def _swap(self, policy) -> None:
        self.policy = policy

    def offer(self, manifest: bytes, bundle: bytes, *, root_chain: list[bytes] = (), wait: str | None = None) -> None:
        path = self.tmp / f"dl-{hashlib.sha256(bundle).hexdigest()}.safetensors"
        path.write_bytes(bundle)
        self.send({"type": "release", "manifest": manifest, "source": {"kind": "url", "url": path.as_uri()},
                   "root_chain": list(root_chain)})
        if wait:
            self.wait_for(wait)

    def send(self, msg: dict) -> None:
        self.agent.on_message(msgpack.packb(msg), self.policy)

    def wait_for(self, prefix: str, timeout: float = 10) -> StatusReport:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.statuses:
                if s.status.startswith(prefix):
                    return s
            time.sleep(0.01)
        raise AssertionError(f"no status {prefix!r}; got {[s.status for s in self.statuses]}")

    def decide(self, n: int) -> None:
        state = self.policy.initial_state()
        rng = np.random.default_rng(0)
        for _ in range(n):
            policy = self.policy
            t0 = time.perf_counter()
            d = policy.act(rng.standard_normal(CFG.obs_dim).astype(np.float32), state)
            finite = bool(np.isfinite(d.value) and np.isfinite(d.log_prob))
            fallback = self.agent.observe(policy, time.perf_counter() - t0, True, finite)
            if fallback is not None:
                self.policy = fallback
            state = d.state if d.state.h.shape[-1] == self.policy.config.hidden else self.policy.initial_state()

    @property
    def model_id(self) -> str:
        return self.policy.model_id


@pytest.fixture
def keys(tmp_path) -> KeyStore:
    return KeyStore.init(tmp_path / "keys")


@pytest.fixture
def dev(tmp_path, keys) -> Harness:
    return Harness(tmp_path, keys)


def release(keys: KeyStore, bundle: bytes, counter: int, **kw) -> bytes:
    return create_release(bundle, keys, counter=counter, model=kw.pop("model", "chain"),
                          fleet=kw.pop("fleet", "plant"), **kw)


def test_a_valid_release_is_installed_trialled_and_committed(dev, keys):
    new = make_bundle(1)
    dev.offer(release(keys, new, 1), new, wait="trial")
    assert dev.model_id == "model-1"
    dev.decide(25)
    dev.wait_for("committed")
    assert [s.status for s in dev.statuses] == ["installed", "trial", "committed"]
    dev.boot()                                     # a reboot runs the committed model
    assert dev.model_id == "model-1" and dev.note is None


def test_unknown_key(dev, keys):
    new = make_bundle(1)
    signed = json.loads(release(keys, new, 1))["signed"]
    forged = json.dumps(sign(signed, [Ed25519PrivateKey.generate()])).encode()
    dev.offer(forged, new)
    report = dev.wait_for("rejected:unknown_key")
    # No counter of an unverified manifest is trusted; its hash names the offer instead.
    assert report.counter is None and report.manifest == hashlib.sha256(forged).hexdigest()
    assert dev.model_id == "model-0" and dev.agent.highest_counter == 0


def test_revoked_or_retired_key(dev, keys, tmp_path):
    new = make_bundle(1)
    old_manifest = release(keys, new, 1)          # signed by the release key about to be retired
    keys.rotate()
    dev.offer(release(keys, new, 1), new, root_chain=keys.root_chain(1), wait="trial")   # walk to root 2
    dev.decide(25)
    dev.wait_for("committed")
    newer = make_bundle(2)
    stale = json.loads(old_manifest)["signed"] | {"counter": 5,
                                                  "bundle": json.loads(release(keys, newer, 5))["signed"]["bundle"]}
    old_key = Ed25519PrivateKey.generate()  # the retired key is gone from keys/; sign as an attacker holding it
    dev.statuses.clear()
    dev.offer(json.dumps(sign(stale, [old_key])).encode(), newer, wait="rejected:unknown_key")
    assert dev.model_id == "model-1"


def test_retired_release_key_itself_is_rejected_after_rotation(tmp_path):
    keys = KeyStore.init(tmp_path / "k")
    retired = keys.key("release-key.pem")
    keys.rotate()
    ts = TrustedState(keys.root_chain(0)[0], now=dt.datetime.now(dt.timezone.utc))
    ts.update_root_chain(keys.root_chain(1))
    bundle = make_bundle(1)
    signed = json.loads(release(keys, bundle, 3))["signed"]
    with pytest.raises(VerificationError) as e:
        ts.verify_release(json.dumps(sign(signed, [retired])).encode(), model="chain", fleet="plant",
                          highest_counter=0, sdk_format_version=1, sdk_version=(9,))
    assert e.value.reason == "unknown_key"


def test_one_byte_of_the_bundle_changed(dev, keys):
    new = make_bundle(1)
    manifest = release(keys, new, 1)
    evil = bytearray(new)
    evil[-10] ^= 0x01
    dev.offer(manifest, bytes(evil), wait="rejected:hash_mismatch")
    assert dev.model_id == "model-0"
    assert not any((dev.tmp / "update" / "models").iterdir()), "nothing unverified is staged"


def test_length_mismatch(dev, keys):
    new = make_bundle(1)
    dev.offer(release(keys, new, 1), new + b"\0" * 8, wait="rejected:length_mismatch")
    dev.statuses.clear()
    dev.offer(release(keys, new, 2), new[:-8], wait="rejected:length_mismatch")
    assert dev.model_id == "model-0"


def test_counter_not_above_the_accepted_one_also_after_a_restart(dev, keys):
    b1, b2 = make_bundle(1), make_bundle(2)
    dev.offer(release(keys, b1, 5), b1, wait="trial")
    dev.decide(25)
    dev.wait_for("committed")
    dev.boot()                                     # restart: the counter was persisted
    dev.offer(release(keys, b2, 5), b2, wait="rejected:rollback")
    dev.statuses.clear()
    dev.offer(release(keys, b2, 4), b2, wait="rejected:rollback")
    assert dev.model_id == "model-1" and dev.agent.highest_counter == 5


def test_fleet_rollback_as_a_higher_counter_accepted_while_the_replayed_old_manifest_is_rejected(dev, keys):
    stable, candidate = make_bundle(1), make_bundle(2)
    stable_manifest = release(keys, stable, 1)
    dev.offer(stable_manifest, stable, wait="trial")
    dev.decide(25)
    dev.wait_for("committed")
    dev.statuses.clear()
    dev.offer(release(keys, candidate, 2), candidate, wait="trial")
    dev.decide(25)
    dev.wait_for("committed")
    dev.statuses.clear()
    dev.offer(stable_manifest, stable, wait="rejected:rollback")      # an attacker replays the old release
    assert dev.model_id == "model-2"
    dev.statuses.clear()
    dev.offer(release(keys, stable, 3), stable, wait="trial")          # the owner rolls the fleet back
    dev.decide(25)
    dev.wait_for("committed")
    assert dev.model_id == "model-1" and dev.agent.highest_counter == 3


def test_a_newer_release_supersedes_a_model_on_trial_and_the_old_trial_never_commits(dev, keys):
    stable, candidate = make_bundle(1), make_bundle(2)
    dev.offer(release(keys, stable, 1), stable, wait="trial")
    dev.decide(25)
    dev.wait_for("committed")
    dev.statuses.clear()
    dev.offer(release(keys, candidate, 2), candidate, wait="trial")      # the canary, on trial
    assert dev.model_id == "model-2"
    dev.decide(5)                                                        # its trial is not over
    dev.offer(release(keys, stable, 3), stable, wait="rolled_back:superseded")   # the rollout rolls back
    dev.wait_for("trial")
    assert [s.status for s in dev.statuses] == ["installed", "trial", "installed", "rolled_back:superseded",
                                                "trial"]
    assert [s.counter for s in dev.statuses][-2:] == [2, 3]
    assert dev.model_id == "model-1"
    dev.decide(25)
    dev.wait_for("committed")
    assert dev.statuses[-1].status == "committed" and dev.statuses[-1].counter == 3
    assert not any(s.status == "committed" and s.counter == 2 for s in dev.statuses)
    dev.boot()
    assert dev.model_id == "model-1" and dev.agent.highest_counter == 3


def test_a_release_offered_during_a_download_waits_for_it_and_only_the_newest_one_waits(tmp_path, keys):
    # The fleet's rollback is one retained message: a device busy with another release when it
    # arrives must install it afterwards, not drop it.
    served = threading.Event()
    bundles = {n: make_bundle(n) for n in (1, 2, 3)}

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.wait(10)                          # the first download hangs until released
            self.send_response(200)
            self.send_header("Content-Length", str(len(bundles[1])))
            self.end_headers()
            self.wfile.write(bundles[1])

        def log_message(self, *a):
            pass

    srv = _Server(Slow)
    try:
        dev = Harness(tmp_path, keys)
        dev.send({"type": "release", "manifest": release(keys, bundles[1], 1),
                  "source": {"kind": "url", "url": srv.url}, "root_chain": []})
        dev.offer(release(keys, bundles[2], 2), bundles[2])        # both arrive during the download
        dev.offer(release(keys, bundles[3], 3), bundles[3])
        assert not any(s.status.startswith("rejected") for s in dev.statuses)
        served.set()
        # Generous, and the decision loop yields between batches: on CI the two installs did not
        # finish within 20 s of a tight loop of decisions on the main thread.
        deadline = time.monotonic() + 60
        while not any(s.status == "trial" and s.counter == 3 for s in dev.statuses):
            dev.decide(5)
            time.sleep(0.005)
            assert time.monotonic() < deadline, [(s.status, s.counter) for s in dev.statuses]
    finally:
        served.set()
        srv.close()
    assert dev.model_id == "model-3"
    assert not any(s.counter == 2 for s in dev.statuses)           # overtaken while it waited
    dev.decide(25)
    dev.wait_for("committed")
    assert dev.statuses[-1].counter == 3


def test_a_trial_that_ends_after_a_newer_install_began_neither_commits_nor_moves_its_state(dev, keys):
    # The trial passes on the decision thread while a newer release installs on the update
    # thread: whichever writes the state second must not undo the other.
    first, second = make_bundle(1), make_bundle(2)
    dev.offer(release(keys, first, 1), first, wait="trial")
    trial = dev.agent.trial
    dev.offer(release(keys, second, 2), second, wait="rolled_back:superseded")
    deadline = time.monotonic() + 10
    while dev.agent.trial is None or dev.agent.trial.release.counter != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert dev.agent._end_trial(trial, None) is None          # too late: release 2 replaced it
    dev.agent._commit(trial)
    assert dev.agent.state.trial.counter == 2 and dev.agent.state.current is None
    assert not any(s.status == "committed" for s in dev.statuses)
    dev.decide(25)
    dev.wait_for("committed")
    assert dev.agent.state.current.counter == 2 and dev.agent.state.trial is None


def test_a_chunked_offer_during_an_install_is_refused_as_busy(dev, keys):
    with dev.agent._lock:
        dev.agent._busy = True                      # as while another release installs
    new = make_bundle(2)
    dev.send({"type": "release", "manifest": release(keys, new, 2), "source": {"kind": "chunks", "count": 3}})
    dev.wait_for("rejected:busy")


def test_incompatible_model(dev, keys):
    other = make_bundle(1, config=ModelConfig(obs_dim=13, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32))
    dev.offer(release(keys, other, 1), other)
    report = dev.wait_for("rejected:incompatible")
    # The manifest verified, so the rejection names its counter: a site rollout attributes it to
    # this release, not to one offered after it.
    assert report.counter == 1
    dev.statuses.clear()
    manifest = json.loads(release(keys, make_bundle(1), 2))["signed"]
    manifest["compat"]["format_version"] = 2
    dev.offer(json.dumps(sign(manifest, [keys.key("release-key.pem")])).encode(), make_bundle(1),
              wait="rejected:incompatible")
    assert dev.model_id == "model-0"


class _Server:
    def __init__(self, handler):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bundle"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_endless_data_is_cut_off_and_leaves_no_file(dev, keys):
    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass

        def log_message(self, *a):
            pass

    srv = _Server(Endless)
    try:
        new = make_bundle(1)
        dev.send({"type": "release", "manifest": release(keys, new, 1), "source": {"kind": "url", "url": srv.url}})
        s = dev.wait_for("rejected:")
        assert s.status == "rejected:length_mismatch", s
        assert not any((dev.tmp / "update" / "staging").iterdir())
    finally:
        srv.close()


def test_a_stalled_download_times_out_and_retries_without_blocking_decisions(tmp_path, keys):
    dev = Harness(tmp_path, keys, download_timeout=0.5, download_retries=2)
    calls = []

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(1)
            time.sleep(3)

        def log_message(self, *a):
            pass

    srv = _Server(Stall)
    try:
        new = make_bundle(1)
        dev.send({"type": "release", "manifest": release(keys, new, 1), "source": {"kind": "url", "url": srv.url}})
        # Had on_message waited for the download, both attempts would have timed out and been
        # reported by now: receiving a release must not wait for its download.
        assert not any(s.status.startswith("rejected") for s in dev.statuses), dev.statuses
        dev.decide(10)                                 # decisions go on meanwhile
        assert not any(s.status.startswith("rejected") for s in dev.statuses)
        assert dev.wait_for("rejected:", timeout=15).status == "rejected:download_failed"
        assert len(calls) == 2
    finally:
        srv.close()


def test_expired_manifest_is_not_installed_the_current_model_keeps_running_and_the_device_reports_it(dev, keys):
    new = make_bundle(1)
    old = release(keys, new, 1, created=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
                  expires=dt.timedelta(days=1))
    dev.offer(old, new, wait="rejected:expired")
    dev.decide(5)
    assert dev.model_id == "model-0"


@pytest.mark.parametrize("field", ["model", "fleet"])
def test_mix_and_match_a_manifest_for_another_model_or_fleet(dev, keys, field):
    new = make_bundle(1)
    dev.offer(release(keys, new, 1, **{field: "elsewhere"}), new, wait="rejected:mismatch")
    assert dev.model_id == "model-0"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_trial_failure_rolls_back_on_nan_outputs(dev, keys):
    bad = make_bundle(1, golden=False, poison=True)
    dev.offer(release(keys, bad, 1), bad, wait="trial")
    dev.decide(5)
    dev.wait_for("rolled_back:nan_outputs")
    assert dev.model_id == "model-0" and dev.agent.highest_counter == 1, "the bad counter stays burnt"
    dev.boot()
    assert dev.model_id == "model-0"


def test_trial_failure_rolls_back_on_a_latency_regression(tmp_path, keys):
    dev = Harness(tmp_path, keys, latency_factor=2.0, latency_slack_us=50.0)
    dev.decide(30)
    dev.agent.baseline_latency_us = np.full(100, 100.0)   # the running model decided in 100 µs
    new = make_bundle(1)
    dev.offer(release(keys, new, 1), new, wait="trial")
    trial_policy = dev.policy
    fallback = None
    for _ in range(dev.settings["trial_decisions"]):   # the new one takes 400 µs, every time
        fallback = fallback or dev.agent.observe(trial_policy, 400e-6, True, True)
    dev._swap(fallback)
    assert dev.wait_for("rolled_back:").status.startswith("rolled_back:latency:p50")
    assert dev.model_id == "model-0"


def test_one_scheduler_stall_in_a_short_trial_does_not_roll_back(tmp_path, keys):
    # 200 simulated devices share one process and two cores: a decision may wait 50 ms for the
    # GIL. A model that is as fast as the last one must still commit.
    dev = Harness(tmp_path, keys, latency_factor=3.0, latency_slack_us=500.0)
    dev.agent.baseline_latency_us = np.full(100, 100.0)
    new = make_bundle(1)
    dev.offer(release(keys, new, 1), new, wait="trial")
    trial_policy = dev.policy
    for i in range(dev.settings["trial_decisions"]):
        assert dev.agent.observe(trial_policy, 0.050 if i == 3 else 100e-6, True, True) is None
    assert dev.wait_for("committed")


def test_golden_outputs_that_differ_on_this_device_reject_the_model(dev, keys):
    b = Bundle.create(CFG, init_params(CFG, 1), model_id="model-1",
                      extra={"x-golden": json.dumps(golden_outputs(Bundle.create(CFG, init_params(CFG, 9))))})
    data = b.to_bytes()
    dev.offer(release(keys, data, 1), data, wait="rejected:golden")


def test_re_delivering_the_installed_release_is_reported_as_already_installed(dev, keys):
    new = make_bundle(1)
    manifest = release(keys, new, 1)
    dev.offer(manifest, new, wait="trial")
    dev.decide(25)
    dev.wait_for("committed")
    dev.offer(manifest, new, wait="already_installed")


def test_bundles_can_arrive_in_mqtt_chunks(dev, keys):
    new = make_bundle(1)
    sha = hashlib.sha256(new).hexdigest()
    dev.send({"type": "release", "manifest": release(keys, new, 1), "source": {"kind": "chunks", "count": 3}})
    size = -(-len(new) // 3)
    for i in (2, 0, 1):                            # in any order
        dev.send({"type": "chunk", "sha256": sha, "index": i, "data": new[i * size:(i + 1) * size]})
    dev.wait_for("trial")
    assert dev.model_id == "model-1"


def test_a_compromised_rollout_service_cannot_install_an_unsigned_artifact(dev, keys):
    new, evil = make_bundle(1), make_bundle(66)
    dev.offer(release(keys, new, 1), evil)          # a signed manifest, other bytes
    assert dev.wait_for("rejected:").status in ("rejected:hash_mismatch", "rejected:length_mismatch")
    dev.statuses.clear()
    signed = json.loads(release(keys, evil, 2))["signed"]
    dev.offer(json.dumps({"signed": signed, "signatures": []}).encode(), evil, wait="rejected:unknown_key")
    dev.statuses.clear()
    dev.send({"type": "release", "manifest": b"{}", "source": {}})
    dev.wait_for("rejected:malformed")
    assert dev.model_id == "model-0"


def test_root_key_rotation(tmp_path):
    keys = KeyStore.init(tmp_path / "k")
    root1 = keys.root_bytes()
    keys.rotate(root=True)          # root 2: signed by root keys 1 and 2
    keys.rotate(root=True)          # root 3
    now = dt.datetime.now(dt.timezone.utc)
    ts = TrustedState(root1, now=now)
    chain = keys.root_chain(1)
    with pytest.raises(VerificationError, match="does not follow"):
        ts.update_root(chain[1])                   # skipping version 2
    assert ts.update_root_chain(chain) == 2 and ts.version == 3
    # Root 2 signed only by its own new key (not by root 1's key) is refused.
    r2 = json.loads(chain[0])
    only_new = {"signed": r2["signed"], "signatures": [r2["signatures"][1]]}
    with pytest.raises(VerificationError, match="lacks signatures of root 1"):
        TrustedState(root1, now=now).update_root(json.dumps(only_new).encode())
    # ...and one signed only by the old key is refused too.
    only_old = {"signed": r2["signed"], "signatures": [r2["signatures"][0]]}
    with pytest.raises(VerificationError, match="its own root keys"):
        TrustedState(root1, now=now).update_root(json.dumps(only_old).encode())


def test_kill_9_at_every_install_step_leaves_a_loadable_verified_model(tmp_path, keys):
    new = make_bundle(1)
    manifest = release(keys, new, 1)
    (tmp_path / "new.safetensors").write_bytes(new)
    (tmp_path / "manifest.json").write_bytes(manifest)
    for step in STEPS:
        work = tmp_path / step
        work.mkdir()
        (work / "factory.safetensors").write_bytes(make_bundle(0))
        script = textwrap.dedent(f"""
            import sys, time, msgpack, numpy as np
            sys.path.insert(0, {os.getcwd()!r})
            from pathlib import Path
            from tests.test_updates import Harness
            from cogbert_cloud.release.signing import KeyStore
            dev = Harness(Path({str(work)!r}), KeyStore(Path({str(keys.root)!r})))
            dev.send({{"type": "release", "manifest": Path({str(tmp_path / 'manifest.json')!r}).read_bytes(),
                      "source": {{"kind": "url", "url": Path({str(tmp_path / 'new.safetensors')!r}).as_uri()}}}})
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                dev.decide(5)
                time.sleep(0.01)
            print("not killed", [s.status for s in dev.statuses])
        """)
        proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "COGBERT_UPDATE_CRASH_AT": step},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 137, (step, proc.stdout, proc.stderr[-2000:])
        after = Harness(work, keys)                # reboot
        assert after.model_id in ("model-0", "model-1"), step
        after.decide(3)                            # and it decides
        if step in ("swap", "trial", "commit"):
            assert after.note == "rolled_back:crash_during_trial" and after.model_id == "model-0", step
        assert after.agent.highest_counter in (0, 1)


def test_commands_sign_and_verify_releases_with_exit_codes(tmp_path):
    cogbert = str(Path(sys.executable).parent / "cogbert")

    def run(*args):
        return subprocess.run([cogbert, "--log-level", "ERROR", *map(str, args)], capture_output=True, text=True)

    assert run("keys", "init", tmp_path / "keys").returncode == 0
    bundle = tmp_path / "m.safetensors"
    bundle.write_bytes(make_bundle(1))
    assert run("release", "create", "--bundle", bundle, "--keys", tmp_path / "keys", "--counter", 3, "--out",
               tmp_path / "out", "--expires", "7d", "--model", "chain", "--fleet", "plant").returncode == 0
    manifest = tmp_path / "out" / "release-3.json"
    ok = run("release", "verify", "--trust", tmp_path / "keys" / "root.json", "--manifest", manifest,
             "--bundle", bundle)
    assert ok.returncode == 0 and "release 3" in ok.stdout
    tampered = tmp_path / "t.safetensors"
    tampered.write_bytes(bundle.read_bytes()[:-1] + b"\x01")
    bad = run("release", "verify", "--trust", tmp_path / "keys" / "root.json", "--manifest", manifest,
              "--bundle", tampered)
    assert bad.returncode == 1 and "hash_mismatch" in bad.stderr
    assert run("release", "verify", "--trust", tmp_path / "keys" / "root.json", "--manifest", manifest, "--bundle",
               bundle, "--above", 3).returncode == 1
    assert run("keys", "rotate", tmp_path / "keys", "--root").returncode == 0
    stale = run("release", "verify", "--trust", tmp_path / "keys" / "roots" / "2.json", "--manifest", manifest,
                "--bundle", bundle)
    assert stale.returncode == 1 and "unknown_key" in stale.stderr   # signed by the retired release key
    assert stat_mode(tmp_path / "keys" / "private" / "root-key.pem") == 0o600
    # Registering a fleet's first stable release: only one that verifies, only one stable.
    store = f"file://{tmp_path / 'store'}"
    root1 = tmp_path / "keys" / "roots" / "1.json"
    reg = ["release", "register", "--store", store, "--manifest", manifest, "--trust", root1]
    refused = run(*reg, "--bundle", tampered)
    assert refused.returncode == 1 and "hash_mismatch" in refused.stderr
    done = run(*reg, "--bundle", bundle)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "stable", done.stderr
    from cogbert_cloud.data.store import open_store
    from cogbert_cloud.release.registry import Registry
    assert Registry(open_store(store)).stable()["counter"] == 3
    assert run(*reg, "--bundle", bundle).returncode == 1, "a second stable release, or the same one twice"


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_a_release_published_on_the_fleet_topic_reaches_a_device_over_mqtt_and_is_committed(tmp_path, keys):
    from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker
    from cogbert_cloud.fleet.pki import PKI
    from cogbert_cloud.release.distribution import publish_release
    from cogbert_edge import Device, DeviceSettings, UpdateSettings
    from cogbert_edge.link.mqtt import LinkSettings, MqttLink

    pki = PKI.init(tmp_path / "pki")
    pki.issue_server(["localhost"])
    pki.issue_device("dev-1", fleet="plant")
    pki.issue_service("rollout")
    (tmp_path / "factory.safetensors").write_bytes(make_bundle(0))
    new = make_bundle(1)
    (tmp_path / "new.safetensors").write_bytes(new)
    (tmp_path / "broker").mkdir()
    with LocalBroker(pki.root, tmp_path / "broker", config=BrokerConfig(plugin_in_confdir=False)) as broker:
        statuses = []
        ctl = MqttLink(LinkSettings.for_service(broker.service_url, pki.root, "rollout",
                                                client_id="rollout-ctl")).start()
        ctl.subscribe("cogbert/v1/plant/+/status", lambda m: statuses.append(json.loads(m.payload))).wait(10)
        # Published before the device connects: the retained fleet release still reaches it.
        for h in publish_release(ctl, "plant", release(keys, new, 1), url=(tmp_path / "new.safetensors").as_uri()):
            h.wait(10)
        dev = Device(DeviceSettings(device_id="dev-1", fleet="plant", broker=broker.url, pki=pki.root,
                                    spool=tmp_path / "spool", bundle=tmp_path / "factory.safetensors",
                                    backend="numpy", trust_root=keys.root / "root.json", model_name="chain",
                                    update=UpdateSettings(trial_decisions=30, trial_seconds=0.0))).start()
        try:
            state = dev.policy.initial_state()
            obs = np.zeros(CFG.obs_dim, np.float32)
            deadline = time.monotonic() + 20
            while not any(s["status"] == "committed" for s in statuses) and time.monotonic() < deadline:
                state = dev.act("u", obs, state).state
                time.sleep(0.002)
            assert [s["status"] for s in statuses][:3] == ["installed", "trial", "committed"], statuses
            assert statuses[-1]["device"] == "dev-1" and dev.policy.model_id == "model-1"
        finally:
            dev.close()
            ctl.close()
