"""``cogbert cloud serve``: the control plane as one long-running service.

It follows the fleet (telemetry and status over MQTT), runs the rollout controller, serves the
operator API, and, with ``--loop``, runs the continuous-learning loop: training as a local
process or a Kubernetes Job, signing through the *store signer* (a separate service that holds
the release key, ``cogbert release signer``), then a staged rollout. This service never holds a
signing key.

Tokens: ``COGBERT_SERVE_READ_TOKENS`` / ``COGBERT_SERVE_OPERATE_TOKENS`` (or the flags) hold the
SHA-256 digests of the bearer tokens, comma-separated (``cogbert cloud token`` makes one).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogbert_cloud.data import keys
from cogbert_cloud.data.store import ObjectStore, open_store
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
from cogbert_edge._internal.log import event
from cogbert_edge.config import add_arguments, from_args
from cogbert_edge.link.mqtt import LinkSettings, MqttLink

__all__ = ["ServeSettings", "StoreSigner", "serve", "register"]

log = logging.getLogger("cogbert.serve")


@dataclass
class ServeSettings:
    broker: str = "mqtts://localhost:8884"
    pki: Path = Path("pki")
    identity: str = "rollout"
    client_id: str = ""
    store: str = "file://./cogbert-store"
    fleet: str = "default"
    model: str = "cogbert"
    host: str = "0.0.0.0"
    port: int = 8080
    read_tokens: tuple[str, ...] = ()
    operate_tokens: tuple[str, ...] = ()
    stages: tuple[int, ...] = (5, 25, 100)
    control_pct: int = 10
    stage_seconds: float = 300.0
    min_devices: int = 5
    min_decisions: int = 5000
    notify_rate: float = 20.0
    # The canary analysis's abort thresholds (RolloutSettings); a rollout request may override
    # each for its rollout (POST /v1/rollouts, cogbert fleet rollout start --max-error-rate ...).
    stage_timeout: float = field(default=300.0, metadata={"help": "a stage still short of data after this many "
                                                                   "seconds aborts"})
    report_timeout: float = field(default=60.0, metadata={"help": "an offered device silent this long counts as "
                                                                    "an install failure"})
    max_install_failure_rate: float = 0.2
    max_error_rate: float = 0.01
    max_nan_rate: float = 0.001
    latency_factor: float = field(default=2.0, metadata={"help": "canary p95 may be this many times the control's "
                                                                 "(plus --latency-slack-us)"})
    latency_slack_us: float = 200.0
    reward_alpha: float = field(default=0.05, metadata={"help": "level of the one-sided reward test"})
    loop: bool = False
    trainer: str = field(default="local", metadata={"help": "local or kubernetes"})
    env: str = "ProductionChain-v0"
    train_steps: int = 1_000_000
    interval: float = 86400.0
    min_new_transitions: int = 1_000_000
    namespace: str = "cogbert"
    image: str = field(default="cogbert:latest", metadata={
        "help": "image of the trainer Jobs (--trainer kubernetes); deploy/k8s sets it to the controller's own"})


class StoreSigner:
    """Asks the signing service for signatures through the object store: writes
    ``signing/requests/{counter}.json`` (with the bundle) and waits for
    ``signing/done/{counter}.json``. The key stays with ``cogbert release signer``."""

    def __init__(self, store: ObjectStore, timeout: float = 3600.0) -> None:
        self.store, self.timeout = store, timeout

    def sign(self, bundle: bytes, counter: int) -> bytes:
        self.store.put(keys.signing_bundle(counter), bundle)
        self.store.put(keys.signing_request(counter), json.dumps({"counter": counter}).encode())
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.store.exists(keys.signing_done(counter)):
                return self.store.get(keys.signing_done(counter))
            time.sleep(2.0)
        raise TimeoutError(f"no signature for release {counter} within {self.timeout:.0f}s")


def sign_requests(store: ObjectStore, keys_dir: Path, *, model: str, fleet: str, expires: str = "30d") -> int:
    """The signing service's side: sign every pending request; returns how many."""
    from cogbert_cloud.release.signing import KeyStore
    from cogbert_cloud.service.loop import KeySigner
    signer = KeySigner(keys_dir, model, fleet, expires)
    # The public root versions after the first, for the controller to send with its offers.
    for raw in KeyStore(keys_dir).root_chain(after=1):
        key = keys.root(int(json.loads(raw)["signed"]["version"]))
        if not store.exists(key):
            store.put(key, raw)
    n = 0
    for key in sorted(store.list(keys.SIGNING_REQUESTS_PREFIX)):
        counter = json.loads(store.get(key))["counter"]
        if store.exists(keys.signing_done(counter)):
            continue
        bundle = store.get(keys.signing_bundle(counter))
        store.put(keys.signing_done(counter), signer.sign(bundle, counter))
        event(log, "signed", counter=counter)
        n += 1
    return n


def serve(s: ServeSettings) -> int:
    import uvicorn

    from cogbert_cloud.service.api import ControlPlane, Tokens, create_app

    store = open_store(s.store)
    registry = Registry(store)
    link = MqttLink(LinkSettings.for_service(s.broker, s.pki, s.identity,
                                             client_id=s.client_id or f"{s.identity}-serve"))
    link.start()
    fleet = FleetView()
    fleet.attach(link, s.fleet)
    controller = RolloutController(RolloutSettings(
        fleet=s.fleet, stages=s.stages, control_pct=s.control_pct, stage_seconds=s.stage_seconds,
        min_devices=s.min_devices, min_decisions=s.min_decisions, notify_rate=s.notify_rate,
        stage_timeout=s.stage_timeout, report_timeout=s.report_timeout,
        max_install_failure_rate=s.max_install_failure_rate, max_error_rate=s.max_error_rate,
        max_nan_rate=s.max_nan_rate, latency_factor=s.latency_factor, latency_slack_us=s.latency_slack_us,
        reward_alpha=s.reward_alpha), registry, link, fleet)
    from cogbert_cloud.fleet.tags import DeviceTags
    tags = DeviceTags(store)
    tags.import_pki(s.pki)          # provisioning tags (pki/index.json) for devices untagged so far
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(1.0):
            try:
                controller.tick()
            except Exception:  # noqa: BLE001 - a failed tick is logged; the next one tries again
                log.exception("controller tick failed")

    threading.Thread(target=ticker, daemon=True, name="controller").start()
    if s.loop:
        threading.Thread(target=_loop, args=(s, store, registry, controller, stop), daemon=True, name="loop").start()
    app = create_app(ControlPlane(registry, controller, fleet, link_up=lambda: link.state.value == "connected",
                                  pki_dir=s.pki, tags=tags),
                     Tokens(read=s.read_tokens, operate=s.operate_tokens))
    server = uvicorn.Server(uvicorn.Config(app, host=s.host, port=s.port, log_level="warning"))

    def shut_down(signum: int, frame: object) -> None:
        stop.set()
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    event(log, "serving", port=s.port, fleet=s.fleet, loop=s.loop)
    server.run()
    stop.set()
    link.close()
    return 0


def _loop(s: ServeSettings, store: ObjectStore, registry: Registry, controller: RolloutController,
          stop: threading.Event) -> None:
    from cogbert_cloud.service.loop import (
        ContinuousLearner,
        KubernetesJobTrainer,
        LocalTrainer,
        LoopSettings,
    )
    ls = LoopSettings(env=s.env, fleet=s.fleet, model=s.model, store_url=s.store, workdir=Path("/tmp/cogbert-loop"),
                      train_steps=s.train_steps, interval=s.interval, min_new_transitions=s.min_new_transitions)
    trainer = (KubernetesJobTrainer(ls, store, namespace=s.namespace, image=s.image) if s.trainer == "kubernetes"
               else LocalTrainer(ls))
    learner = ContinuousLearner(ls, registry, controller, trainer, StoreSigner(store))
    while not stop.wait(60.0):
        busy = controller.rollout is not None and controller.rollout.active
        if busy or registry.stable() is None or not learner.due():
            continue
        try:
            learner.round()
        except Exception:  # noqa: BLE001 - a failed round is logged and retried at the next trigger
            log.exception("learning round failed")


def register(csub: argparse._SubParsersAction, rsub: argparse._SubParsersAction | None = None) -> None:
    p = csub.add_parser("serve", help="the control plane: rollout controller, operator API, learning loop")
    add_arguments(p, ServeSettings, env_prefix="SERVE_")
    p.set_defaults(func=lambda a: serve(from_args(ServeSettings, a, env_prefix="SERVE_")))
    t = csub.add_parser("token", help="make an API bearer token and print it with its digest")
    t.add_argument("--export", choices=("read", "operate"), default=None,
                   help="print shell `export` lines instead of JSON: COGBERT_API_TOKEN (for clients) and "
                        "the digest as COGBERT_SERVE_READ_TOKENS or COGBERT_SERVE_OPERATE_TOKENS (for serve)")

    def token(a: argparse.Namespace) -> int:
        from cogbert_cloud.service.api import token_digest
        tok = secrets.token_urlsafe(24)
        if a.export:
            print(f"export COGBERT_API_TOKEN={tok}")
            print(f"export COGBERT_SERVE_{a.export.upper()}_TOKENS={token_digest(tok)}")
        else:
            print(json.dumps({"token": tok, "sha256": token_digest(tok)}))
        return 0

    t.set_defaults(func=token)
    if rsub is not None:
        sg = rsub.add_parser("signer", help="sign the control plane's pending signing requests (holds the key)")
        sg.add_argument("--keys", type=Path, required=True)
        sg.add_argument("--store", required=True)
        sg.add_argument("--model", default="cogbert")
        sg.add_argument("--fleet", default="default")
        sg.add_argument("--watch", type=float, default=0.0, help="keep polling every this many seconds")

        def signer(a: argparse.Namespace) -> int:
            store = open_store(a.store)
            while True:
                n = sign_requests(store, a.keys, model=a.model, fleet=a.fleet)
                if not a.watch:
                    print(f"signed {n} request(s)")
                    return 0
                time.sleep(a.watch)

        sg.set_defaults(func=signer)
