"""The operator HTTP API (FastAPI): health, readiness, Prometheus metrics, releases, rollouts,
devices.

    GET  /health                       liveness: the process answers
    GET  /ready                        readiness: the broker link is up and the store answers (503 if not)
    GET  /metrics                      Prometheus text exposition (for the cluster's scraper)
    GET  /v1/releases[/{counter}]      the registry                               read
    GET  /v1/rollouts                  the current rollout and past ones          read
    POST /v1/rollouts                  {"candidate": N}: start a rollout          operate
    POST /v1/rollouts/current/{pause,resume,abort}  [{"reason": "..."}]           operate
    GET  /v1/devices[/{id}]            version, last seen, outbox depth, telemetry read

Every ``/v1`` call needs ``Authorization: Bearer TOKEN``; a token has the role ``read`` or
``operate`` (which includes read). Tokens are configured as their SHA-256 digests, never in the
clear. Bad requests get a 4xx with a message (401 no or unknown token, 403 wrong role, 404
unknown object, 409 not possible now, 422 malformed body, numbers out of range, NaN or
infinities included). Status codes follow from exception types (``NotFoundError`` 404,
``ConflictError`` 409), never from message text; anything else is a bug: a 500, logged with its
traceback and counted in ``cogbert_api_errors_total``.

Metric labels never take a value the client chose: the method is one of the standard ones or
``other``, the path is the matched route's template or ``unmatched``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from cogbert_cloud.data import keys
from cogbert_cloud.errors import ConflictError, NotFoundError
from cogbert_cloud.fleet.tags import DeviceTags
from cogbert_cloud.release.registry import Registry
from cogbert_cloud.release.rollout import DeviceRecord, FleetView, RolloutController
from cogbert_cloud.service.fleet_metrics import FleetCounters, build_info, expiry_metrics
from cogbert_edge.errors import ConfigError
from cogbert_edge.wire.topics import check_device_id

__all__ = ["ControlPlane", "Tokens", "create_app", "token_digest"]

Role = Literal["read", "operate"]
log = logging.getLogger("cogbert.api")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Tokens:
    """SHA-256 digests of bearer tokens, by role."""

    read: tuple[str, ...] = ()
    operate: tuple[str, ...] = ()

    def role(self, token: str) -> Role | None:
        d = token_digest(token)
        if any(hmac.compare_digest(d, x) for x in self.operate):
            return "operate"
        if any(hmac.compare_digest(d, x) for x in self.read):
            return "read"
        return None


@dataclass
class ControlPlane:
    """What the API shows and steers."""

    registry: Registry
    controller: RolloutController
    fleet: FleetView
    link_up: Callable[[], bool] = lambda: True
    ingest_stats: Callable[[], dict] = dict
    pki_dir: Path | None = None          # certificates and CRLs whose expiry /metrics reports
    fleet_counters: FleetCounters = field(default_factory=FleetCounters)
    tags: DeviceTags | None = None       # device tags (fleet/tags.py); None: no tags here

    def __post_init__(self) -> None:
        if self.tags is not None:
            self.controller.device_tags = self.tags.get


class StartRollout(BaseModel):
    candidate: int = Field(ge=1, le=2**53, allow_inf_nan=False)
    # Optional per-rollout overrides of the service's abort thresholds and stage times, and
    # the tag whose devices form the cohorts. Bounded: a threshold outside them is a 422.
    tag: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_install_failure_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_error_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_nan_rate: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    latency_factor: float | None = Field(default=None, ge=1, le=100, allow_inf_nan=False)
    latency_slack_us: float | None = Field(default=None, ge=0, le=1e7, allow_inf_nan=False)
    reward_alpha: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False)
    stage_seconds: float | None = Field(default=None, ge=0, le=7 * 86400, allow_inf_nan=False)
    stage_timeout: float | None = Field(default=None, gt=0, le=30 * 86400, allow_inf_nan=False)
    report_timeout: float | None = Field(default=None, gt=0, le=86400, allow_inf_nan=False)

    def overrides(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if k not in ("candidate", "tag") and v is not None}


class SetTags(BaseModel):
    tags: list[str] = Field(max_length=32)


class Reason(BaseModel):
    reason: str = Field(default="operator", max_length=500)


def create_app(cp: ControlPlane, tokens: Tokens) -> FastAPI:
    app = FastAPI(title="Cogbert control plane", version="1")
    requests_total: dict[tuple[str, str, int], int] = {}
    errors_total = {"internal": 0}
    # One registry for the app's life: the histogram accumulates, the collectors read live state.
    metrics_registry = CollectorRegistry()
    metrics_registry.register(_Collector(cp, requests_total, errors_total))
    ProcessCollector(registry=metrics_registry)      # process_* (CPU, memory, open files)
    PlatformCollector(registry=metrics_registry)     # python_info
    GCCollector(registry=metrics_registry)
    duration = Histogram("cogbert_api_request_duration_seconds", "Time to answer an API request",
                         ["method", "path"], registry=metrics_registry,
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
            code = response.status_code
        except Exception:
            code = 500
            raise
        finally:
            route = request.scope.get("route")
            method = request.method if request.method in METHODS else "other"
            key = (method, getattr(route, "path", "unmatched"), code)
            requests_total[key] = requests_total.get(key, 0) + 1
            duration.labels(method, key[1]).observe(time.perf_counter() - t0)
        return response

    def need(role: Role):
        def check(request: Request) -> str:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
            have = tokens.role(token.strip())
            if have is None:
                raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
            if role == "operate" and have != "operate":
                raise HTTPException(403, "this token may read but not operate")
            return have
        return Depends(check)

    @app.exception_handler(NotFoundError)
    async def not_found(_: Request, e: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=404)

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, e: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's own rendering echoes the input, and a NaN or an infinity in it cannot be
        # written as JSON: say what is wrong, with the offending values made printable.
        return JSONResponse({"detail": [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""),
                                         "input": _printable(err.get("input"))} for err in e.errors()]},
                            status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        errors_total["internal"] += 1
        log.exception("internal error", extra={"fields": {"event": "api_internal_error", "path": request.url.path[:200],
                                                          "method": request.method[:16]}})
        return JSONResponse({"detail": "internal error (logged)"}, status_code=500)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> JSONResponse:
        problems = []
        if not cp.link_up():
            problems.append("broker link is down")
        try:
            cp.registry.store.exists(keys.PROBE)
        except Exception as e:  # noqa: BLE001 - any store failure means not ready
            problems.append(f"store: {str(e)[:120]}")
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=503 if problems else 200)

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics_registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/releases", dependencies=[need("read")])
    def releases() -> list[dict]:
        return cp.registry.list()

    @app.get("/v1/releases/{counter}", dependencies=[need("read")])
    def release(counter: int) -> dict:
        return cp.registry.get(counter)

    @app.get("/v1/rollouts", dependencies=[need("read")])
    def rollouts() -> dict:
        return {"current": cp.controller.status() or None, "history": cp.controller.history[-20:]}

    @app.post("/v1/rollouts", status_code=201)
    def start(body: StartRollout, role: str = need("operate")) -> dict:
        return cp.controller.start(body.candidate, actor="api", overrides=body.overrides(), tag=body.tag)

    @app.post("/v1/rollouts/current/{action}")
    def act(action: Literal["pause", "resume", "abort"], body: Reason | None = None,
            role: str = need("operate")) -> dict:
        if action == "pause":
            return cp.controller.pause(actor="api")
        if action == "resume":
            return cp.controller.resume(actor="api")
        return cp.controller.abort((body or Reason()).reason, actor="api")

    @app.get("/v1/devices", dependencies=[need("read")])
    def devices(tag: str | None = None) -> list[dict]:
        views = [_device_view(d, v, _tags(d)) for d, v in sorted(cp.fleet.snapshot().items())]
        return [v for v in views if tag is None or tag in v["tags"]]

    def _tags(device: str) -> list[str]:
        return sorted(cp.tags.get(device)) if cp.tags is not None else []

    @app.put("/v1/devices/{device}/tags")
    def set_tags(device: str, body: SetTags, role: str = need("operate")) -> dict:
        if cp.tags is None:
            raise HTTPException(409, "this service keeps no device tags")
        try:
            check_device_id(device)
            tags = cp.tags.set(device, body.tags)
        except ConfigError as e:
            raise HTTPException(422, str(e)) from None
        cp.registry.audit.record("device_tags", device=device, tags=tags, actor="api")
        return {"device": device, "tags": tags}

    @app.get("/v1/devices/{device}", dependencies=[need("read")])
    def device(device: str) -> dict:
        snap = cp.fleet.snapshot()
        if device not in snap:
            raise HTTPException(404, f"no device {device!r} has reported")
        return _device_view(device, snap[device], _tags(device))

    # The web console (GET /console) and its read endpoints (/v1/whoami, /v1/audit).
    from cogbert_cloud.service import console
    console.mount(app, cp, need)
    return app


def _device_view(device: str, v: DeviceRecord, tags: list[str] | None = None) -> dict:
    t = v.telemetry
    return {"device": device, "tags": tags or [], "model": t.model if t else None, "release": t.release if t else None,
            "last_seen": v.last_seen or None, "outbox_pending": t.outbox.pending if t else None,
            "last_status": v.statuses[-1].report.status if v.statuses else None,
            "telemetry": t.to_dict() if t else {}}


class _Collector:
    """Metrics computed at scrape time from the control plane's state."""

    def __init__(self, cp: ControlPlane, requests_total: dict, errors_total: dict) -> None:
        self.cp, self.requests_total, self.errors_total = cp, requests_total, errors_total

    def collect(self):
        now = time.time()
        snap = self.cp.fleet.snapshot()
        yield GaugeMetricFamily("cogbert_devices", "Devices that have reported", value=len(snap))
        recent = sum(1 for v in snap.values() if now - v.last_seen < 60)
        yield GaugeMetricFamily("cogbert_devices_reporting", "Devices that reported in the last 60 s", value=recent)
        pending = sum(v.telemetry.outbox.pending for v in snap.values() if v.telemetry)
        yield GaugeMetricFamily("cogbert_device_outbox_pending_records",
                                "Experience records waiting on devices for the cloud's acknowledgement", value=pending)
        # Restart-safe sums of the devices' counters, and the fleet's latency histogram.
        self.cp.fleet_counters.update(snap)
        yield from self.cp.fleet_counters.collect()
        yield build_info(_version())
        states = GaugeMetricFamily("cogbert_releases", "Releases in the registry by state", labels=["state"])
        counts: dict[str, int] = {}
        for r in self.cp.registry.list():
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        for state in ("candidate", "canary", "stable", "rolled_back", "retired"):
            states.add_metric([state], counts.get(state, 0))
        yield states
        stable = self.cp.registry.stable()
        yield GaugeMetricFamily("cogbert_stable_release", "Counter of the stable release",
                                value=stable["counter"] if stable else 0)
        r = self.cp.controller.status()
        running = GaugeMetricFamily("cogbert_rollout_running", "1 while a rollout is running or paused")
        running.add_metric([], 1 if r and r.get("state") in ("running", "paused") else 0)
        yield running
        stage = GaugeMetricFamily("cogbert_rollout_stage", "Index of the current rollout stage")
        stage.add_metric([], r.get("stage", 0) if r else 0)
        yield stage
        if r and r.get("state") in ("running", "paused"):
            yield GaugeMetricFamily("cogbert_rollout_stage_started_timestamp_seconds",
                                    "When the current rollout stage began (Unix seconds)", value=r["stage_started"])
        else:
            yield GaugeMetricFamily("cogbert_rollout_stage_started_timestamp_seconds",
                                    "When the current rollout stage began (Unix seconds)")
        finished = CounterMetricFamily("cogbert_rollouts_finished", "Rollouts finished since the service started, "
                                       "by result", labels=["result"])
        results = [h.get("result") for h in self.cp.controller.history]
        for result in ("promoted", "rolled_back"):
            finished.add_metric([result], results.count(result))
        yield finished
        yield GaugeMetricFamily("cogbert_broker_connected", "1 while the control plane's link to the broker is up",
                                value=int(bool(self.cp.link_up())))
        n = CounterMetricFamily("cogbert_rollout_notifications", "Release offers published to devices")
        n.add_metric([], self.cp.controller.notifications)
        yield n
        req = CounterMetricFamily("cogbert_api_requests", "API requests", labels=["method", "path", "code"])
        for (m, p, c), v in sorted(self.requests_total.items()):
            req.add_metric([m, p, str(c)], v)
        yield req
        yield CounterMetricFamily("cogbert_api_errors", "Requests that failed for a bug of ours (500s, logged)",
                                  value=self.errors_total["internal"])
        live = [r for r in self.cp.registry.list() if r.get("state") in ("stable", "canary")]
        try:
            roots = self.cp.controller.root_chain()
            manifests = [(r["counter"], self.cp.registry.files(r["counter"])[1]) for r in live]
        except Exception as e:  # noqa: BLE001 - a store hiccup must not fail the whole scrape
            log.warning("expiry metrics unavailable: %s", str(e)[:200])
            roots, manifests = [], []
        yield from expiry_metrics(self.cp.pki_dir, roots, manifests)
        ing = self.cp.ingest_stats()
        for key in ("accepted", "duplicate", "rejected", "transitions"):
            if key in ing:
                c = CounterMetricFamily(f"cogbert_ingest_{key}", f"Ingestion: {key}")
                c.add_metric([], ing[key])
                yield c


def _version() -> str:
    from cogbert_edge import __version__
    return __version__


def _printable(v: Any) -> Any:
    """``v`` with NaN and infinities as strings, so that it can be written as JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {str(k)[:100]: _printable(x) for k, x in list(v.items())[:20]}
    if isinstance(v, (list, tuple)):
        return [_printable(x) for x in v[:20]]
    if isinstance(v, (str, bytes)):
        return v[:200] if isinstance(v, str) else repr(v[:200])
    return v if v is None or isinstance(v, (bool, int, float)) else str(v)[:200]
