"""A site's coordinator: gathers the agents' messages for a step, resolves conflicts over the shared
maintenance crew, answers within a deadline, and measures the site's coordination.

The coordinator is a member of its site with the ``coordinator`` site role in its certificate
(``cogbert pki`` issues it like an agent's, ``site_role="coordinator"``); the broker lets it alone
publish decisions. For each step it waits until every agent's message arrived or ``deadline_ms``
passed since the first one, then publishes a :class:`~cogbert_edge.wire.messages.SiteDecision`:
claims granted by the site's one rule (highest wear sensor first, ties to the lower agent index:
``cogbert_edge.site.agent.resolve_claims``, which the simulator applies too), the others denied,
and the members whose messages were missing.

Metrics (``metrics()``, its telemetry topic every ``telemetry_s``, and Prometheus text on
``/metrics`` when ``metrics_port`` is set):

* message latency, agent send -> coordinator receipt, p50/p99 (agents' and coordinator's clocks:
  keep them in NTP sync; the agents also report the clock-free round trip);
* synchronisation efficiency: the fraction of steps where every agent's message arrived in time;
* conflicts (more claims than free crews) and how they were resolved.

Run it: ``python -m cogbert_cloud.service.coordinator --fleet F --site S --device ID --members a,b,c
--broker mqtts://... --pki DIR``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from cogbert_edge.errors import ConfigError, WireError
from cogbert_edge.link.mqtt import LinkSettings, Message, MqttLink
from cogbert_edge.site.agent import resolve_claims
from cogbert_edge.wire.messages import AgentMessage, SiteDecision, Telemetry
from cogbert_edge.wire.topics import check_device_id, check_fleet, check_site, device_topic, site_filter, site_topic

__all__ = ["CoordinatorSettings", "Coordinator", "main"]


@dataclass
class CoordinatorSettings:
    device_id: str
    fleet: str
    site: str
    members: list[str]
    broker: str
    pki: Path
    deadline_ms: float = 30.0
    telemetry_s: float = 5.0
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        check_device_id(self.device_id)
        check_fleet(self.fleet)
        check_site(self.site)
        if not self.members:
            raise ConfigError("a site needs at least one agent")
        for m in self.members:
            check_device_id(m)
        if not self.deadline_ms > 0:
            raise ConfigError(f"deadline_ms must be > 0, got {self.deadline_ms}")


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.s = settings
        self.link = MqttLink(LinkSettings.for_device(settings.broker, settings.pki, settings.device_id,
                                                     backoff_min=0.05, backoff_max=1.0),
                             name=f"coordinator-{settings.site}")
        self._lock = threading.Lock()
        self._pending: dict[int, dict[str, AgentMessage]] = {}
        self._first: dict[int, float] = {}
        self._answered: deque[int] = deque(maxlen=1024)
        self._stop = threading.Event()
        self.latency_ms: deque[float] = deque(maxlen=8192)
        self.steps = 0
        self.steps_in_sync = 0
        self.conflicts = 0
        self.resolutions: dict[str, int] = {"granted_highest_sensor": 0, "denied_crew_busy": 0}
        self.claims = 0
        self.late_messages = 0
        self.bad_messages = 0
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self._boot = secrets.token_hex(8)

    def start(self, timeout: float = 10.0) -> Coordinator:
        self.link.start()
        self.link.wait_connected(timeout)
        self.link.subscribe(site_filter(self.s.fleet, self.s.site, "msg"), self._on_msg, qos=0).wait(timeout)
        for target in (self._deadline_loop, self._telemetry_loop):
            t = threading.Thread(target=target, daemon=True, name=f"coordinator-{target.__name__}")
            t.start()
            self._threads.append(t)
        if self.s.metrics_port is not None:
            self._serve_metrics(self.s.metrics_port)
        return self

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        if self._http is not None:
            self._http.shutdown()
        self.link.close()

    # -- gathering and deciding -----------------------------------------------------------------

    def _on_msg(self, m: Message) -> None:
        now = time.time_ns()
        try:
            msg = AgentMessage.decode(m.payload)
        except WireError:
            self.bad_messages += 1
            return
        if msg.agent not in self.s.members or not m.topic.endswith(f"/{msg.agent}/msg"):
            self.bad_messages += 1
            return
        ready = None
        with self._lock:
            if msg.step in self._answered:
                self.late_messages += 1      # after the deadline: the step was already decided
                return
            self.latency_ms.append((now - msg.sent_ns) / 1e6)
            got = self._pending.setdefault(msg.step, {})
            got[msg.agent] = msg
            self._first.setdefault(msg.step, time.monotonic())
            if len(got) == len(self.s.members):
                ready = self._take(msg.step)
        if ready is not None:
            self._decide(*ready, in_sync=True)

    def _take(self, step: int) -> tuple[int, dict[str, AgentMessage]]:
        got = self._pending.pop(step)
        self._first.pop(step, None)
        self._answered.append(step)
        return step, got

    def _deadline_loop(self) -> None:
        while not self._stop.wait(0.002):
            now = time.monotonic()
            due = []
            with self._lock:
                for step, t0 in list(self._first.items()):
                    if now - t0 >= self.s.deadline_ms / 1000.0:
                        due.append(self._take(step))
            for step, got in due:
                self._decide(step, got, in_sync=False)

    def _decide(self, step: int, got: dict[str, AgentMessage], *, in_sync: bool) -> None:
        members = self.s.members
        claims = {a: (m.sensor, members.index(a)) for a, m in got.items() if m.claim}
        # Crews free: what the agents observe (they see the same crew); the most cautious view.
        free = min(m.free for m in got.values())
        granted = resolve_claims(claims, free)
        denied = sorted(set(claims) - granted, key=members.index)
        missing = [a for a in members if a not in got]
        d = SiteDecision(step, tuple(sorted(granted, key=members.index)), tuple(denied), tuple(missing), time.time_ns())
        self.link.publish(site_topic(self.s.fleet, self.s.site, self.s.device_id, "decision"), d.encode(), qos=0)
        with self._lock:
            self.steps += 1
            self.steps_in_sync += int(in_sync)
            self.claims += len(claims)
            if len(claims) > free:
                self.conflicts += 1
                if granted:
                    self.resolutions["granted_highest_sensor"] += 1
                else:
                    self.resolutions["denied_crew_busy"] += 1

    # -- metrics --------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            lat = np.array(self.latency_ms) if self.latency_ms else None
            return {"site": self.s.site, "coordinator": self.s.device_id, "steps": self.steps,
                    "sync_efficiency": self.steps_in_sync / self.steps if self.steps else None,
                    "message_latency_ms_p50": float(np.percentile(lat, 50)) if lat is not None else None,
                    "message_latency_ms_p99": float(np.percentile(lat, 99)) if lat is not None else None,
                    "claims": self.claims, "conflicts": self.conflicts, "resolutions": dict(self.resolutions),
                    "late_messages": self.late_messages, "bad_messages": self.bad_messages}

    def prometheus(self) -> str:
        m = self.metrics()
        lab = f'site="{self.s.site}"'
        lines = ["# TYPE cogbert_site_steps_total counter", f"cogbert_site_steps_total{{{lab}}} {m['steps']}",
                 "# TYPE cogbert_site_sync_efficiency gauge",
                 f"cogbert_site_sync_efficiency{{{lab}}} {m['sync_efficiency'] or 0.0}",
                 "# TYPE cogbert_site_conflicts_total counter",
                 f"cogbert_site_conflicts_total{{{lab}}} {m['conflicts']}",
                 "# TYPE cogbert_site_conflict_resolutions_total counter"]
        lines += [f'cogbert_site_conflict_resolutions_total{{{lab},how="{k}"}} {v}'
                  for k, v in m["resolutions"].items()]
        lines += ["# TYPE cogbert_site_message_latency_ms gauge"]
        for q in ("p50", "p99"):
            v = m[f"message_latency_ms_{q}"]
            if v is not None:
                lines.append(f'cogbert_site_message_latency_ms{{{lab},quantile="{q[1:]}"}} {v:.3f}')
        lines += ["# TYPE cogbert_site_late_messages_total counter",
                  f"cogbert_site_late_messages_total{{{lab}}} {m['late_messages']}"]
        return "\n".join(lines) + "\n"

    def _telemetry_loop(self) -> None:
        topic = device_topic(self.s.fleet, self.s.device_id, "telemetry")
        while not self._stop.wait(self.s.telemetry_s):
            try:
                # A valid Telemetry message (readers ignore unknown fields) carrying the site's metrics.
                t = Telemetry(device=self.s.device_id, model="site-coordinator", time=time.time(), boot=self._boot)
                body = {**t.to_dict(), "site_coordination": self.metrics()}
                self.link.publish(topic, json.dumps(body).encode(), qos=0)
            except Exception:  # telemetry is best effort; the next interval sends it again
                pass

    def _serve_metrics(self, port: int) -> None:
        coord = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                body = coord.prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True, name="coordinator-metrics").start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogbert_cloud.service.coordinator",
                                description="Run a multi-agent site's coordinator")
    p.add_argument("--fleet", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--device", required=True, help="the coordinator's device id (site role coordinator)")
    p.add_argument("--members", required=True, help="the site's agents, comma-separated, in agent-index order")
    p.add_argument("--broker", required=True)
    p.add_argument("--pki", required=True, type=Path)
    p.add_argument("--deadline-ms", type=float, default=30.0)
    p.add_argument("--telemetry-s", type=float, default=5.0)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--metrics-file", type=Path, help="write metrics() as JSON here every second")
    a = p.parse_args(argv)
    try:
        c = Coordinator(CoordinatorSettings(a.device, a.fleet, a.site, a.members.split(","), a.broker, a.pki,
                                            a.deadline_ms, a.telemetry_s, a.metrics_port)).start()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(json.dumps({"event": "coordinator_ready", "site": a.site}), flush=True)
    try:
        while not stop.wait(1.0):
            if a.metrics_file:
                tmp = a.metrics_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(c.metrics()))
                tmp.replace(a.metrics_file)
    except KeyboardInterrupt:
        pass
    finally:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
