"""``cogbert cloud decide``: serve, make client tokens, make state-token keys."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from cogbert_cloud.service.decide.config import ENV_PREFIX, DecideSettings
from cogbert_edge.config import add_arguments, from_args

__all__ = ["register", "serve", "build_app"]


def build_app(s: DecideSettings):
    """The engine and its ASGI app (the engine starts in the app's lifespan startup)."""
    from cogbert_cloud.service.decide.app import DecideApp
    from cogbert_cloud.service.decide.engine import Engine
    return DecideApp(Engine(s))


def serve(s: DecideSettings) -> int:
    import uvicorn

    app = build_app(s)
    kw: dict = {}
    if s.tls_cert is not None:
        kw.update(ssl_certfile=str(s.tls_cert), ssl_keyfile=str(s.tls_key))
    # uvloop, httptools and websockets: measured the fastest of the candidates (docs/decision-service.md).
    config = uvicorn.Config(app, host=s.host, port=s.port, loop="uvloop", http="httptools", ws="websockets-sansio",
                            lifespan="on", log_level="warning", access_log=False, backlog=4096,
                            timeout_graceful_shutdown=int(s.graceful_seconds), ws_max_size=s.max_body_bytes,
                            ws_per_message_deflate=False, **kw)
    uvicorn.Server(config).run()    # SIGTERM: stop accepting, drain, then the lifespan shutdown flushes logs
    return 0


def register(csub: argparse._SubParsersAction) -> None:
    p = csub.add_parser("decide", help="the decision service for thin clients (HTTP and WebSocket)")
    dsub = p.add_subparsers(dest="decide_cmd", required=True, metavar="COMMAND")
    sv = dsub.add_parser("serve", help="serve a signed release's policy over HTTP and WebSocket")
    add_arguments(sv, DecideSettings, env_prefix=ENV_PREFIX)
    sv.set_defaults(func=lambda a: serve(from_args(DecideSettings, a, env_prefix=ENV_PREFIX)))

    t = dsub.add_parser("token", help="add a client to a clients file and print its bearer token (once)")
    t.add_argument("name")
    t.add_argument("--clients", type=Path, required=True, help="the clients file to add it to")
    t.add_argument("--fleet", default="default")
    t.add_argument("--rate", type=float, default=5000.0, help="decisions per second")
    t.add_argument("--burst", type=float, default=10000.0)

    def token(a: argparse.Namespace) -> int:
        from cogbert_cloud.service.decide.auth import add_client
        secret = add_client(a.clients, a.name, a.fleet, rate=a.rate, burst=a.burst)
        print(json.dumps({"client": a.name, "token": secret}))
        return 0

    t.set_defaults(func=token)
    k = dsub.add_parser("state-key", help="print a new state-token key (ID:HEX) to add to the key ring")
    k.add_argument("--id", type=int, default=1, help="key id, 0-255")

    def key(a: argparse.Namespace) -> int:
        if not 0 <= a.id <= 255:
            print("cogbert: --id must be 0-255", file=sys.stderr)
            return 2
        print(f"{a.id}:{secrets.token_hex(32)}")
        return 0

    k.set_defaults(func=key)
