"""Distributed tracing with OpenTelemetry: optional, and nothing at all when not configured.

Cogbert's code calls :func:`span` around the steps worth seeing in a trace (an experience
batch's upload, its ingestion and store write; a release's training, gate, export, signing and
rollout stages). What happens then depends on the process:

- ``opentelemetry-api`` not installed (a device with only the SDK's dependencies): :func:`span`
  is a context manager that does nothing, and no trace context is sent.
- installed, but no exporter configured: OpenTelemetry's default no-op tracer; spans cost a
  few function calls and are not recorded. Trace context that arrives is still passed on.
- :func:`configure_tracing` called with ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set and ``opentelemetry-sdk`` plus
  ``opentelemetry-exporter-otlp-proto-http`` installed (``pip install 'cogbert[tracing]'``):
  spans are batched and exported over OTLP/HTTP to that collector (Jaeger, Tempo, an
  OpenTelemetry Collector). ``OTEL_SERVICE_NAME`` and the other standard ``OTEL_*`` variables
  apply.

Across MQTT the context travels as W3C ``traceparent``/``tracestate`` in MQTT 5 user properties
(:func:`mqtt_properties`, :func:`context_from_properties`); across time (a release's rollout
hours after its training) as the same strings stored with the release (:func:`carrier`,
:func:`context_from_carrier`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["span", "configure_tracing", "shutdown_tracing", "carrier", "context_from_carrier", "mqtt_properties",
           "context_from_properties", "current_trace_id", "enabled"]

log = logging.getLogger("cogbert.trace")

try:
    from opentelemetry import context as _otel_context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _otel_trace
except ImportError:   # the SDK without the tracing extra
    _otel_trace = None  # type: ignore[assignment]

_provider: Any = None       # the TracerProvider configure_tracing made (None: OpenTelemetry's global one)
_TRACER_NAME = "cogbert"
_HEADERS = ("traceparent", "tracestate")


def enabled() -> bool:
    """Whether the OpenTelemetry API is importable here (spans may then be recorded)."""
    return _otel_trace is not None


@contextlib.contextmanager
def span(name: str, *, parent: Any = None, start_time: float | None = None, **attributes: object) -> Iterator[Any]:
    """A span named ``name`` around the block, child of the current span or of ``parent`` (a
    context from :func:`context_from_carrier` or :func:`context_from_properties`). Attributes
    that are None are left out. ``start_time`` (Unix seconds) backdates the start, for a step
    whose beginning was seen earlier (a rollout stage). Yields the span (or None without
    OpenTelemetry). An exception
    leaving the block is recorded on the span and re-raised."""
    if _otel_trace is None:
        yield None
        return
    attrs = {k: v for k, v in attributes.items() if v is not None and isinstance(v, (str, bool, int, float))}
    tracer = (_provider or _otel_trace).get_tracer(_TRACER_NAME)
    start = int(start_time * 1e9) if start_time is not None else None
    with tracer.start_as_current_span(name, context=parent, attributes=attrs, start_time=start) as s:
        yield s


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (empty when there is none to send)."""
    if _otel_trace is None:
        return {}
    out: dict[str, str] = {}
    _propagate.inject(out)
    return {k: v for k, v in out.items() if k in _HEADERS}


def context_from_carrier(headers: Mapping[str, str] | None) -> Any:
    """A parent context from stored W3C headers; None when there is nothing usable (a new
    trace begins)."""
    if _otel_trace is None or not headers:
        return None
    clean = {k: str(v)[:512] for k, v in headers.items() if k in _HEADERS and isinstance(v, str)}
    if not clean:
        return None
    return _propagate.extract(clean)


def mqtt_properties(props: Any = None) -> Any:
    """MQTT 5 PUBLISH properties carrying the current trace context as user properties (added
    to ``props`` if given); None when there is no context and no ``props``."""
    headers = carrier()
    if not headers:
        return props
    if props is None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.PUBLISH)
    existing = list(getattr(props, "UserProperty", []) or [])
    props.UserProperty = existing + [(k, v) for k, v in headers.items()]
    return props


def context_from_properties(props: Any) -> Any:
    """The parent context a publisher put in a message's user properties, or None. The
    properties come from the network: only the two W3C keys are read, bounded in size."""
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    if not pairs:
        return None
    headers: dict[str, str] = {}
    for pair in list(pairs)[:32]:
        if isinstance(pair, tuple) and len(pair) == 2 and pair[0] in _HEADERS and isinstance(pair[1], str):
            headers[pair[0]] = pair[1]
    return context_from_carrier(headers)


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits (for logs), or None."""
    if _otel_trace is None:
        return None
    ctx = _otel_trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def configure_tracing(service_name: str, *, exporter: Any = None, set_global: bool = True) -> bool:
    """Set up export for this process, once: ``exporter`` (a span exporter: tests pass an
    in-memory one) or OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set. Returns whether spans are now exported.
    Without either, or without the SDK, nothing changes and nothing is recorded. With
    ``set_global`` (the default) the provider also becomes OpenTelemetry's global one, for other
    libraries' instrumentation; :func:`shutdown_tracing` undoes a non-global one."""
    global _provider
    if _provider is not None:
        return True
    if _otel_trace is None:
        return False
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter is None and not endpoint:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning("tracing is configured (%s) but opentelemetry-sdk is not installed: pip install "
                    "'cogbert[tracing]'", "OTEL_EXPORTER_OTLP_ENDPOINT")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       service_name)}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTLP export needs opentelemetry-exporter-otlp-proto-http: pip install 'cogbert[tracing]'")
            return False
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if set_global:
        _otel_trace.set_tracer_provider(provider)
    _provider = provider
    return True


def shutdown_tracing() -> None:
    """Export what is buffered and stop recording (spans after this are no-ops again, unless
    the provider was made global)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def attach(ctx: Any) -> Any:
    """Make ``ctx`` current (returns a token for :func:`detach`); for code that cannot use a
    ``with`` block around the work."""
    if _otel_trace is None or ctx is None:
        return None
    return _otel_context.attach(ctx)


def detach(token: Any) -> None:
    if token is not None and _otel_trace is not None:
        _otel_context.detach(token)
