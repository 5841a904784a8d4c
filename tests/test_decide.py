"""The decision service as its clients meet it: real uvicorn processes on loopback ports, the
edge SDK's client, and a Policy in this process as the reference."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

from cogbert_cloud.fleet.broker import free_port
from cogbert_cloud.release.signing import KeyStore, create_release
from cogbert_cloud.service.decide.auth import add_client
from cogbert_cloud.service.decide.engine import _Uniforms, uniform_for
from cogbert_cloud.service.decide.sessions import Session, SessionCache
from cogbert_cloud.service.decide.tokens import KeyRing
from cogbert_edge import (
    ActionSpace,
    AsyncDecideClient,
    Bundle,
    DecideClient,
    DecideRequestError,
    ModelConfig,
    Policy,
    init_params,
)

BACKEND = "native"
CFG = ModelConfig(obs_dim=8, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)


def make_site(root: Path, *, fleet: str = "plant", model_id: str = "m1", seed: int = 0) -> dict:
    """A signed release, its trust root, a clients file and a state key, as an operator makes them."""
    root.mkdir(parents=True, exist_ok=True)
    raw = Bundle.create(CFG, init_params(CFG, seed, policy_gain=1.0), model_id=model_id).to_bytes()
    (root / "model.safetensors").write_bytes(raw)
    keys = KeyStore.init(root / "keys")
    (root / "root.json").write_bytes(keys.root_bytes())
    (root / "release.json").write_bytes(create_release(raw, keys, counter=1, model="cogbert", fleet=fleet))
    token = add_client(root / "clients.json", "web", fleet)
    other_fleet = add_client(root / "clients.json", "other-fleet-app", "elsewhere")
    other = add_client(root / "clients.json", "mobile", fleet)
    return {"root": root, "token": token, "other_client": other, "state_keys": "1:" + secrets.token_hex(32),
            "fleet": fleet, "keys": keys, "bundle": raw,
            "other_fleet_token": other_fleet}


class Replica:
    """``cogbert cloud decide serve`` in its own process."""

    def __init__(self, site: dict, lanes: str, spool: Path, **flags: object) -> None:
        self.port = free_port()
        root = site["root"]
        args = ["--trust-root", root / "root.json", "--manifest", root / "release.json", "--bundle",
                root / "model.safetensors", "--fleet", site["fleet"], "--clients", root / "clients.json",
                "--state-keys", site["state_keys"], "--lanes", lanes, "--spool", spool, "--port", self.port,
                "--backend", BACKEND]
        for k, v in flags.items():
            args += ["--" + k.replace("_", "-"), v]
        self.log = spool.parent / f"{lanes.replace(',', '_')}.log"
        spool.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from cogbert_cloud.cli import main; "
                                      "sys.exit(main())", "cloud", "decide", "serve", *map(str, args)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"replica not ready: {self.log.read_text()[-2000:]}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: bytes, token: str | None, ctype: str = "application/json") -> tuple[int, dict,
                                                                                                       dict]:
        headers = {"Content-Type": ctype}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                doc = msgpack.unpackb(raw) if ctype == "application/msgpack" else json.loads(raw)
            except (ValueError, msgpack.UnpackException):
                doc = {"raw": raw[:200].decode("latin-1")}
            return e.code, doc, {k.lower(): v for k, v in e.headers.items()}

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def reference(site: dict) -> tuple[Policy, bytes]:
    """One Policy, and the sampling seed every replica derives from the shared state key."""
    policy = Policy.load(site["bundle"], BACKEND)
    key = bytes.fromhex(site["state_keys"].split(":", 1)[1])
    return policy, hmac.digest(key, b"cogbert-decide-sampling", "sha256")


def reference_step(policy: Policy, seed: bytes, session: str, step: int, obs: np.ndarray, state):
    u = np.array([[uniform_for(seed, session, step)]])
    d = policy.act_batch(obs[None, :], state, rng=_Uniforms(u))  # type: ignore[arg-type]
    return int(d.action[0]), float(d.log_prob[0]), float(d.value[0]), d.state


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("decide"))


@pytest.fixture(scope="module")
def replicas(site):
    root = site["root"]
    a = Replica(site, "decide-a", root / "spool-a")
    b = Replica(site, "decide-b", root / "spool-b")
    yield a, b
    a.stop()
    b.stop()


def test_a_session_moving_between_two_replicas_gets_exactly_one_policys_actions(site, replicas):
    a, b = replicas
    policy, seed = reference(site)
    rng = np.random.default_rng(3)
    for encoding in ("msgpack", "json"):
        c = DecideClient(a.url, site["token"], encoding=encoding)
        sid = c.start_session(f"moving-{encoding}")
        state = policy.initial_state(1)
        for step in range(30):
            replica = a if (step // 3) % 2 == 0 else b       # three steps here, three there
            c.close()
            c.port = replica.port
            obs = rng.standard_normal(CFG.obs_dim).astype(np.float32)
            d = c.act(sid, obs)
            action, logp, value, state = reference_step(policy, seed, sid, step, obs, state)
            assert d.step == step
            assert d.action == action, f"step {step}: the replica chose {d.action}, the Policy {action}"
            assert d.log_prob == pytest.approx(logp, abs=1e-6) and d.value == pytest.approx(value, abs=1e-6)
            assert d.model == "m1" and d.latency_us > 0
        c.close()


def test_without_tokens_a_replica_keeps_the_state_and_another_replica_does_not_know_the_session(site, replicas):
    a, b = replicas
    policy, seed = reference(site)
    ca = DecideClient(a.url, site["token"], use_state_tokens=False)
    sid = ca.start_session("cached-1")
    state = policy.initial_state(1)
    for step in range(5):
        obs = np.full(CFG.obs_dim, step / 5, np.float32)
        d = ca.act(sid, obs)
        action, _, _, state = reference_step(policy, seed, sid, step, obs, state)
        assert (d.step, d.action) == (step, action)
    with pytest.raises(DecideRequestError) as e:
        DecideClient(b.url, site["token"], use_state_tokens=False).act(sid, np.zeros(CFG.obs_dim))
    assert e.value.status == 404 and e.value.code == "unknown_session"


def test_tokens_of_another_key_model_session_or_client_are_refused(site, replicas):
    a, _ = replicas
    ca = DecideClient(a.url, site["token"])
    sid = ca.start_session("tok-1")
    good = ca.sessions.tokens[sid]
    h = np.zeros(CFG.hidden, np.float32)
    ring = KeyRing.parse(site["state_keys"])
    forged = {
        "another key": KeyRing.parse("1:" + secrets.token_hex(32)).seal("web", sid, "m1", 0, h, h),
        "another model": ring.seal("web", sid, "m-unknown", 0, h, h),
        "another session": ring.seal("web", "tok-2", "m1", 0, h, h),
        "another client": ring.seal("mobile", sid, "m1", 0, h, h),
        "altered byte": good[:-20] + bytes([good[-20] ^ 1]) + good[-19:],
        "truncated": good[:30],
        "garbage": b"\x00" * 200,
    }
    for what, tok in forged.items():
        ca.sessions.tokens[sid] = tok
        with pytest.raises(DecideRequestError) as e:
            ca.act(sid, np.zeros(CFG.obs_dim))
        assert e.value.status == 409 and e.value.code == "bad_state_token", what
    ca.sessions.tokens[sid] = good
    assert ca.act(sid, np.zeros(CFG.obs_dim)).step == 0, "the refused tokens changed nothing"


def test_hostile_requests_get_4xx_with_a_message_and_change_nothing(site, replicas):
    a, _ = replicas
    policy, seed = reference(site)
    tok = site["token"]
    ca = DecideClient(a.url, tok, encoding="json")
    sid = ca.start_session("victim")
    ok_obs = [0.1] * CFG.obs_dim
    cases = [
        ("no token", b'{"session":"victim","obs":[0]}', None, 401),
        ("wrong token", b'{"session":"victim","obs":[0]}', "cbd_nope", 401),
        ("another fleet's client", json.dumps({"session": "victim", "obs": ok_obs}).encode(), None, 403),
        ("not JSON", b"{nope", tok, 400),
        ("not an object", b"[1,2]", tok, 400),
        ("short obs", json.dumps({"session": "victim", "obs": [1.0] * 3}).encode(), tok, 400),
        ("long obs", json.dumps({"session": "victim", "obs": [1.0] * 100}).encode(), tok, 400),
        ("nested obs", json.dumps({"session": "victim", "obs": [[1.0]] * CFG.obs_dim}).encode(), tok, 400),
        ("string obs", json.dumps({"session": "victim", "obs": ["x"] * CFG.obs_dim}).encode(), tok, 400),
        ("NaN obs", ('{"session":"victim","obs":[NaN' + ",0" * (CFG.obs_dim - 1) + "]}").encode(), tok, 400),
        ("Inf obs", ('{"session":"victim","obs":[Infinity' + ",0" * (CFG.obs_dim - 1) + "]}").encode(), tok, 400),
        ("huge number", ('{"session":"victim","obs":[1e400' + ",0" * (CFG.obs_dim - 1) + "]}").encode(), tok, 400),
        ("bad session id", json.dumps({"session": "../../etc", "obs": ok_obs}).encode(), tok, 400),
        ("long session id", json.dumps({"session": "x" * 65, "obs": ok_obs}).encode(), tok, 400),
        ("unknown session", json.dumps({"session": "never-started", "obs": ok_obs}).encode(), tok, 404),
        ("wrong type flag", json.dumps({"session": "victim", "obs": ok_obs, "deterministic": "yes"}).encode(), tok,
         400),
        ("token not a string", json.dumps({"session": "victim", "obs": ok_obs, "state": 5}).encode(), tok, 400),
        ("duplicate session in a batch", json.dumps({"requests": [{"session": "victim", "obs": ok_obs}] * 2}).encode(),
         tok, 400),
        ("empty batch", b'{"requests":[]}', tok, 400),
        ("too many in a batch", json.dumps({"requests": [{"session": f"s{i}", "obs": ok_obs}
                                                         for i in range(600)]}).encode(), tok, 413),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, tok, 400),
        ("NaN reward", b'{"session":"victim","reward":NaN}', tok, 400),
    ]
    for what, body, token, status in cases:
        path = "/v1/reward" if b'"reward"' in body else "/v1/act"
        if what == "another fleet's client":
            token = site["other_fleet_token"]
        code, doc, _ = a.post(path, body, token)
        assert code == status, f"{what}: {code} {doc}"
        assert doc.get("message"), f"{what}: no message"
    # A huge body is refused from its Content-Length, before it is read: the client gets the 413
    # while it is still sending (urllib would see the connection reset under its write instead).
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    conn.putrequest("POST", "/v1/act")
    conn.putheader("Authorization", f"Bearer {tok}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2_000_001))
    conn.endheaders()
    conn.send(b'{"session":"victim","obs":[' + b"0," * 1000)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"] == "too_large"
    conn.close()
    code, doc, _ = a.post("/v1/act", msgpack.packb({"session": "victim", "obs": b"\x00" * 7}), tok,
                          "application/msgpack")
    assert code == 400
    code, doc, _ = a.post("/v1/act", b"\xc1\xc1garbage", tok, "application/msgpack")
    assert code == 400
    code, _, _ = a.post("/v1/nowhere", b"{}", tok)
    assert code == 404
    # Nothing changed: the victim's first decision is still its step 0, and what one Policy gives.
    obs = np.asarray(ok_obs, np.float32)
    d = ca.act(sid, obs)
    action, _, _, _ = reference_step(policy, seed, sid, 0, obs, policy.initial_state(1))
    assert (d.step, d.action) == (0, action)
    status, metrics = a.get("/metrics")
    assert status == 200 and b'status="500"' not in metrics


def test_websocket_streams_many_sessions_in_order_with_the_policys_actions(site, replicas):
    a, _ = replicas
    policy, seed = reference(site)

    async def run() -> None:
        async with AsyncDecideClient(a.url, site["token"]) as c:
            names = [await c.start_session(f"ws-{i}") for i in range(16)]
            states = {n: policy.initial_state(1) for n in names}
            rng = np.random.default_rng(5)
            for step in range(10):
                obs = {n: rng.standard_normal(CFG.obs_dim).astype(np.float32) for n in names}
                # Many messages in flight at once: half the sessions one by one, half in one message.
                singles = [asyncio.ensure_future(c.act(n, obs[n])) for n in names[:8]]
                many = await c.act_many({n: obs[n] for n in names[8:]})
                got = {d.session: d for d in await asyncio.gather(*singles)} | many
                for n in names:
                    action, _, _, states[n] = reference_step(policy, seed, n, step, obs[n], states[n])
                    assert (got[n].step, got[n].action) == (step, action)
            # Without tokens, back-to-back decisions of one session are still applied in order.
            c.use_state_tokens = False
            futs = [asyncio.ensure_future(c.act(names[0], np.zeros(CFG.obs_dim))) for _ in range(20)]
            steps = [d.step for d in await asyncio.gather(*futs)]
            assert steps == list(range(10, 30))

    asyncio.run(run())


def test_a_full_queue_answers_503_with_retry_after_and_a_late_decision_gets_the_fallback(site, tmp_path):
    r = Replica(site, "decide-q", tmp_path / "spool", max_queue=4, deadline_ms=0.001, fallback_action=2)
    try:
        c = DecideClient(r.url, site["token"], retries=0)
        names = [c.start_session(f"q{i}") for i in range(8)]
        with pytest.raises(DecideRequestError) as e:
            c.act_many({n: np.zeros(CFG.obs_dim) for n in names})
        assert e.value.status == 503 and e.value.code == "overloaded" and e.value.retry_after
        code, _, headers = r.post("/v1/act", json.dumps({"requests": [{"session": n, "obs": [0.0] * 8}
                                                                      for n in names]}).encode(), site["token"])
        assert code == 503 and int(headers["retry-after"]) >= 1
        d = c.act(names[0], np.zeros(CFG.obs_dim))
        assert d.fallback and d.action == 2 and d.log_prob == 0.0 and d.step == 0
        assert c.act(names[0], np.zeros(CFG.obs_dim)).step == 1
    finally:
        # uvicorn drains, runs the lifespan shutdown, then re-raises the SIGTERM it caught.
        assert r.stop() in (0, -15)
        assert "decide_stopped" in r.log.read_text(), "the shutdown flushed the lanes' logs"
    r2 = Replica(site, "decide-q2", tmp_path / "spool2", deadline_ms=0.001)
    try:
        c = DecideClient(r2.url, site["token"], retries=0)
        n = c.start_session("late")
        with pytest.raises(DecideRequestError) as e:
            c.act(n, np.zeros(CFG.obs_dim))
        assert e.value.status == 503 and e.value.code == "deadline_exceeded"
    finally:
        r2.stop()


def test_health_ready_and_metrics(replicas):
    a, _ = replicas
    assert a.get("/health")[0] == 200 and a.get("/ready")[0] == 200
    status, text = a.get("/metrics")
    for name in (b"cogbert_decide_request_seconds_bucket", b"cogbert_decide_queue_wait_seconds_bucket",
                 b"cogbert_decide_batch_size_bucket", b"cogbert_decide_decisions_total",
                 b"cogbert_decide_session_evictions"):
        assert name in text, name


def test_an_unsigned_or_tampered_release_is_never_served(site, tmp_path):
    bad = make_site(tmp_path / "other")          # a release signed by other keys
    root = site["root"]
    p = subprocess.run([sys.executable, "-c", "import sys; from cogbert_cloud.cli import main; sys.exit(main())",
                        "cloud", "decide", "serve", "--trust-root", str(root / "root.json"), "--manifest",
                        str(bad["root"] / "release.json"), "--bundle", str(bad["root"] / "model.safetensors"),
                        "--fleet", "plant", "--clients", str(root / "clients.json"), "--state-keys",
                        site["state_keys"], "--spool", str(tmp_path / "spool"), "--port", str(free_port())],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "release key" in p.stderr, p.stderr[-500:]


def test_the_session_cache_is_bounded_and_counts_evictions():
    cache = SessionCache(max_bytes=10 * (2 * 4 * 32 + 600), idle_seconds=0.05)
    h = np.zeros(32, np.float32)
    for i in range(25):
        cache.put(Session("web", f"s{i}", None, None, "m", h.copy(), h.copy()))
    assert len(cache) == 10 and cache.evicted_memory == 15
    assert cache.get("web", "s0") is None and cache.get("web", "s24") is not None
    assert cache.get("mobile", "s24") is None, "sessions are per client"
    time.sleep(0.1)
    assert cache.sweep() == 10 and cache.evicted_idle == 10 and cache.bytes == 0


def test_client_settings_are_checked():
    with pytest.raises(ValueError):
        DecideClient("ftp://x", "t")
    with pytest.raises(ValueError):
        AsyncDecideClient("nope", "t")


def test_websocket_refuses_bad_tokens_and_answers_bad_messages_without_closing(site, replicas):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    a, _ = replicas
    url = f"ws://127.0.0.1:{a.port}/v1/stream"

    async def run() -> None:
        with pytest.raises(InvalidStatus):
            await connect(url, additional_headers={"Authorization": "Bearer cbd_forged"})
        async with connect(url + f"?access_token={site['token']}") as ws:   # the browser's way
            for raw in ("{nope", "[1, 2]", json.dumps({"op": "fly", "id": 1}),
                        json.dumps({"op": "act", "id": 2, "session": "nobody", "obs": [0.0] * CFG.obs_dim}),
                        json.dumps({"op": "act", "id": 3, "session": "x", "obs": [float("nan")] * CFG.obs_dim}),
                        "[" * 50_000 + "]" * 50_000):
                await ws.send(raw)
                r = json.loads(await ws.recv())
                assert 400 <= r["status"] < 500 and r["message"], (raw[:40], r)
            await ws.send(msgpack.packb({"op": "start", "id": 9, "session": "ws-after-garbage"}))
            r = msgpack.unpackb(await ws.recv())
            assert r["status"] == 200 and r["id"] == 9, "the connection still serves"

    asyncio.run(run())
