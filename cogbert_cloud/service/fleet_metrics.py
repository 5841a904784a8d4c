"""Metrics of the fleet and of the control plane's trust material, for the operator API's
``/metrics``.

- **Reset-safe fleet counters.** Devices report cumulative counters (decisions, errors, NaNs)
  that start again at 0 when a device process restarts (a new ``boot`` in its telemetry). A
  plain sum over devices would then go down, which Prometheus's ``rate()`` reads as a counter
  reset and turns into a spike. :class:`FleetCounters` adds each device's *increase* instead:
  the difference while ``boot`` is the same and the value grows, the whole new value after a
  restart. The fleet total only grows. It is updated from the fleet's latest telemetry at
  each scrape, so what a device counted between the last scrape and its restart is lost (at
  most one scrape interval of one device's decisions); nothing is counted twice.
- **Fleet decision latency**, a histogram of the devices' reported p95 (seconds): one
  observation per new telemetry report seen at a scrape. ``histogram_quantile`` over it gives
  the p95 most devices stay under; the share above a bucket is the share of device reports
  that missed that objective.
- **Expiry timestamps** (Unix seconds) of what would lock devices or services out when it
  lapses: the CA and server/service certificates and the CRLs in the PKI directory the
  service was given, the newest root metadata, and each live release's manifest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from cogbert_cloud.release.rollout.fleet import DeviceRecord
from cogbert_edge._internal.log import event

__all__ = ["FleetCounters", "LATENCY_BUCKETS_S", "expiry_metrics", "build_info"]

log = logging.getLogger("cogbert.metrics")

# Decision latency objectives live between 100 µs and 10 ms on the devices Cogbert targets.
LATENCY_BUCKETS_S = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1)
_COUNTED = ("decisions", "errors", "nonfinite")


class FleetCounters:
    """Monotone fleet totals and the latency histogram, from telemetry snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, dict[str, int]]] = {}    # device -> (boot, last counters)
        self.totals = dict.fromkeys(_COUNTED, 0)
        self.restarts = 0
        self._seen: dict[str, float] = {}                          # device -> telemetry time observed
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._sum = 0.0
        self._count = 0

    def update(self, snapshot: Mapping[str, DeviceRecord]) -> None:
        with self._lock:
            for device, v in snapshot.items():
                t = v.telemetry
                if t is None:
                    continue
                now = {"decisions": t.decisions, "errors": t.errors, "nonfinite": t.nonfinite}
                prev = self._last.get(device)
                restarted = prev is not None and (prev[0] != t.boot or now["decisions"] < prev[1]["decisions"])
                for k in _COUNTED:
                    if prev is None or restarted or now[k] < prev[1][k]:
                        inc = now[k]          # first sight, or a restart: its counters began again at 0
                    else:
                        inc = now[k] - prev[1][k]
                    self.totals[k] += max(inc, 0)
                self.restarts += int(restarted)
                self._last[device] = (t.boot, now)
                p95 = t.latency_p95_us
                if p95 is not None and p95 >= 0 and self._seen.get(device) != t.time:
                    self._seen[device] = t.time
                    self._observe(float(p95) / 1e6)

    def _observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS_S) if seconds <= b), len(LATENCY_BUCKETS_S))
        self._buckets[i] += 1
        self._sum += seconds
        self._count += 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            totals, restarts = dict(self.totals), self.restarts
            buckets, total_sum = list(self._buckets), self._sum
        names = {"decisions": "Decisions the devices reported (restart-safe: increases summed)",
                 "errors": "Decision errors the devices reported (restart-safe)",
                 "nonfinite": "Non-finite model outputs the devices reported (restart-safe)"}
        for k in _COUNTED:
            yield CounterMetricFamily(f"cogbert_device_{k}", names[k], value=totals[k])
        yield CounterMetricFamily("cogbert_device_restarts", "Device process restarts seen in telemetry",
                                  value=restarts)
        cum, out = 0, []
        for b, n in zip(LATENCY_BUCKETS_S, buckets, strict=False):
            cum += n
            out.append((repr(b), cum))
        out.append(("+Inf", cum + buckets[-1]))
        yield HistogramMetricFamily("cogbert_fleet_decision_latency_p95_seconds",
                                    "Devices' reported decision latency p95, one observation per telemetry report",
                                    buckets=out, sum_value=total_sum)


def build_info(version: str) -> GaugeMetricFamily:
    import platform
    g = GaugeMetricFamily("cogbert_build_info", "Always 1: the version of Cogbert this process runs",
                          labels=["version", "python"])
    g.add_metric([version, platform.python_version()], 1)
    return g


def expiry_metrics(pki_dir: Path | None, roots: list[bytes], manifests: list[tuple[int, bytes]]) -> Iterator[Metric]:
    """Expiry timestamps of certificates and CRLs under ``pki_dir``, the newest root metadata
    in ``roots`` and the release manifests ``(counter, manifest)``. A file that cannot be read
    is skipped and logged: a metric must never break the scrape."""
    certs = GaugeMetricFamily("cogbert_certificate_expiry_timestamp_seconds",
                              "When a certificate stops being valid (not_after), Unix seconds", labels=["kind", "name"])
    crls = GaugeMetricFamily("cogbert_crl_next_update_timestamp_seconds",
                             "When a certificate revocation list expires (next_update): past it the broker "
                             "refuses every client of that CA", labels=["ca"])
    if pki_dir is not None:
        from cryptography import x509
        d = Path(pki_dir)
        cert_files = [("ca", "fleet", d / "ca.pem"), ("ca", "services", d / "services-ca.pem"),
                      ("server", "broker", d / "server" / "cert.pem")]
        cert_files += [("service", p.parent.name, p) for p in sorted((d / "services").glob("*/cert.pem"))]
        for kind, name, path in cert_files:
            if path.exists():
                try:
                    c = x509.load_pem_x509_certificate(path.read_bytes())
                    certs.add_metric([kind, name], c.not_valid_after_utc.timestamp())
                except (OSError, ValueError) as e:
                    event(log, "metric_read_failed", level=logging.WARNING, path=str(path), error=str(e)[:200])
        for ca, path in (("fleet", d / "crl.pem"), ("services", d / "services-crl.pem")):
            if path.exists():
                try:
                    crl = x509.load_pem_x509_crl(path.read_bytes())
                    nu = crl.next_update_utc
                    if nu is not None:
                        crls.add_metric([ca], nu.timestamp())
                except (OSError, ValueError) as e:
                    event(log, "metric_read_failed", level=logging.WARNING, path=str(path), error=str(e)[:200])
    yield certs
    yield crls
    root = GaugeMetricFamily("cogbert_root_expiry_timestamp_seconds",
                             "When the newest root metadata the devices are sent expires", labels=["version"])
    newest = None
    for raw in roots:
        try:
            signed = json.loads(raw)["signed"]
            if newest is None or int(signed["version"]) > int(newest["version"]):
                newest = signed
        except (ValueError, KeyError, TypeError):
            continue
    if newest is not None and (t := _time(newest.get("expires"))) is not None:
        root.add_metric([str(newest["version"])], t)
    yield root
    rel = GaugeMetricFamily("cogbert_release_expiry_timestamp_seconds",
                            "When a live (stable or canary) release's manifest expires", labels=["counter"])
    for counter, manifest in manifests:
        try:
            t = _time(json.loads(manifest)["signed"].get("expires"))
        except (ValueError, KeyError, TypeError, AttributeError):
            t = None
        if t is not None:
            rel.add_metric([str(counter)], t)
    yield rel


def _time(s: Any) -> float | None:
    try:
        return dt.datetime.strptime(str(s), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc).timestamp()
    except ValueError:
        return None
