"""Prometheus metrics of one engine (its own registry: several engines in one process, as in
tests, do not collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

# Seconds: from tens of microseconds (a lone decision) to the deadline range.
_LAT = (25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 25.6e-3, 51.2e-3, 0.1, 0.2)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, engine: Any) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cogbert_decide_requests", "Requests by transport, operation and status",
                                ["transport", "op", "status"], registry=r)
        self.latency = Histogram("cogbert_decide_request_seconds", "Server-side request latency",
                                 ["transport"], buckets=_LAT, registry=r)
        self.queue_wait = Histogram("cogbert_decide_queue_wait_seconds",
                                    "Longest wait of a decision for its batch, per batch", buckets=_LAT, registry=r)
        self.compute = Histogram("cogbert_decide_batch_compute_seconds", "Time of one batch step",
                                 buckets=_LAT, registry=r)
        self.batch_size = Histogram("cogbert_decide_batch_size", "Decisions per batch", buckets=_BATCH, registry=r)
        self.decisions = Counter("cogbert_decide_decisions", "Decisions made by the model", registry=r)
        self.fallbacks = Counter("cogbert_decide_fallbacks", "Decisions answered with the fallback action",
                                 registry=r)
        self.expired = Counter("cogbert_decide_deadline_expired", "Decisions not started before their deadline",
                               registry=r)
        self.overloaded = Counter("cogbert_decide_overloaded", "Requests refused with 503: queue full", registry=r)
        self.token_refused = Counter("cogbert_decide_state_tokens_refused", "State tokens that did not verify",
                                     registry=r)
        g = Gauge("cogbert_decide_sessions", "Sessions in the server-side cache", registry=r)
        g.set_function(lambda: len(engine.cache))
        g = Gauge("cogbert_decide_session_bytes", "Bytes of the server-side session cache", registry=r)
        g.set_function(lambda: engine.cache.bytes)
        ev = Gauge("cogbert_decide_session_evictions", "Sessions evicted from the cache", ["reason"], registry=r)
        ev.labels("idle").set_function(lambda: engine.cache.evicted_idle)
        ev.labels("memory").set_function(lambda: engine.cache.evicted_memory)
        g = Gauge("cogbert_decide_queue", "Decisions waiting for a batch", registry=r)
        g.set_function(lambda: len(engine._queue))
        g = Gauge("cogbert_decide_ready", "1 when a verified model is loaded and serving", registry=r)
        g.set_function(lambda: 1.0 if engine.ready else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
