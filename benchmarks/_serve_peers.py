"""The peers ``cogbert-bench serve`` measures the decision service against, each run as its own
process (``python -m cogbert_bench._serve_peers --peer KIND --port P --bundle B``): Ray Serve and
FastAPI with ONNX Runtime serving the same model, and bare server and framework candidates on a
trivial endpoint (``--frameworks``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np


def _ray_server(port: int, bundle: Path) -> None:
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from cogbert_edge import Policy

    ray.init(num_cpus=2, include_dashboard=False, logging_level=40)   # logging.ERROR
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(num_replicas=1, max_ongoing_requests=1000)
    class Decide:
        def __init__(self) -> None:
            self.policy = Policy.load(bundle, "native")
            self.states: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            self.zero = np.zeros(self.policy.config.hidden, np.float32)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        async def decide(self, reqs: list[dict]) -> list[dict]:
            from cogbert_edge import State
            obs = np.asarray([r["obs"] for r in reqs], np.float32)
            st = [self.states.get(r["session"], (self.zero, self.zero)) for r in reqs]
            d = self.policy.act_batch(obs, State(np.stack([s[0] for s in st]), np.stack([s[1] for s in st])))
            out = []
            for i, r in enumerate(reqs):
                self.states[r["session"]] = (d.state.h[i].copy(), d.state.c[i].copy())
                out.append({"action": int(d.action[i]), "log_prob": float(d.log_prob[i]),
                            "value": float(d.value[i]), "batch": len(reqs)})
            return out

        async def __call__(self, request: Request) -> Any:
            if request.url.path.endswith("/health"):
                return JSONResponse({"ok": True})
            return JSONResponse(await self.decide(await request.json()))

    serve.run(Decide.bind(), route_prefix="/")  # type: ignore[attr-defined]
    while True:
        time.sleep(3600)


def _fastapi_onnx_server(port: int, bundle: Path) -> None:
    import onnxruntime as ort
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from cogbert_bench.peers import onnx_model
    from cogbert_edge import load_bundle

    b = load_bundle(bundle)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_model(b.fp32_params(), b.config).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    hidden = b.config.hidden
    states: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    zero = np.zeros((1, hidden), np.float32)
    rng = np.random.default_rng(0)
    app = FastAPI()

    class Act(BaseModel):
        session: str
        obs: list[float]

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    def act(req: Act) -> dict:
        h, c = states.get(req.session, (zero, zero))
        head, value, h2, c2 = sess.run(["head", "value", "h_out", "c_out"],
                                       {"obs": np.asarray([req.obs], np.float32), "h": h, "c": c})
        states[req.session] = (h2, c2)
        p = np.exp(head[0] - head[0].max())
        p /= p.sum()
        a = int(rng.choice(len(p), p=p))
        return {"action": a, "log_prob": float(np.log(p[a])), "value": float(value[0, 0]), "batch": 1}

    act.__annotations__.update(req=Act, **{"return": dict})   # resolved here, not in module globals (PEP 563)
    app.post("/v1/act")(act)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- server and framework candidates, on a trivial endpoint -------------------------------------

FRAMEWORKS = ("asgi-uvicorn", "asgi-granian", "starlette-uvicorn", "fastapi-uvicorn")
_REPLY = msgpack.packb({"session": "s", "action": 1, "log_prob": -1.0, "value": 0.0, "model": "m", "step": 0,
                        "compute_us": 0.0, "latency_us": 0.0, "state": None})


async def bare_app(scope: dict, receive: Any, send: Any) -> None:
    """The candidates' endpoint as a bare ASGI callable: read the body, parse it, answer."""
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if body:
        msgpack.unpackb(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/msgpack"), (b"content-length", str(len(_REPLY)).encode())]})
    await send({"type": "http.response.body", "body": _REPLY})


def _framework_app(kind: str) -> Any:
    if kind.startswith("asgi"):
        return bare_app
    from starlette.requests import Request
    from starlette.responses import Response
    if kind.startswith("starlette"):
        from starlette.applications import Starlette
        from starlette.routing import Route

        async def act(request: Request) -> Response:
            msgpack.unpackb(await request.body())
            return Response(_REPLY, media_type="application/msgpack")

        async def health(request: Request) -> Response:
            return Response(b"{}", media_type="application/json")

        return Starlette(routes=[Route("/v1/act", act, methods=["POST"]), Route("/v1/sessions", act, methods=["POST"]),
                                 Route("/health", health)])
    from fastapi import FastAPI
    app = FastAPI()

    async def act_(request: Request) -> Response:
        msgpack.unpackb(await request.body())
        return Response(_REPLY, media_type="application/msgpack")

    # This module's annotations are strings (PEP 563) that FastAPI resolves in module globals,
    # where Request is not: give it the class itself.
    act_.__annotations__.update(request=Request, response=Response)
    app.post("/v1/act")(act_)
    app.post("/v1/sessions")(act_)

    @app.get("/health")
    async def health_() -> dict:
        return {}

    return app


def _framework_server(kind: str, port: int) -> None:
    import uvicorn
    uvicorn.run(_framework_app(kind), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


def _peer_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True, choices=("ray", "fastapi-onnx", *FRAMEWORKS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    a = p.parse_args()
    if a.peer in FRAMEWORKS:
        _framework_server(a.peer, a.port)
    else:
        (_ray_server if a.peer == "ray" else _fastapi_onnx_server)(a.port, a.bundle)


if __name__ == "__main__":
    _peer_main()
