"""Structured logs: one JSON object a line for machines, one readable line for people.

Every record carries ``time`` (RFC 3339, UTC, milliseconds), ``level``, ``logger`` and
``message``; records written with :func:`event` also carry ``event`` (the same as ``message``)
and their fields, for example::

    {"time": "2026-12-03T09:12:44.031Z", "level": "info", "logger": "cogbert.ingest",
     "message": "ingest_started", "event": "ingest_started", "broker": "mqtts://...", ...}

On a terminal the same record reads::

    09:12:44.031 INFO  cogbert.ingest  ingest_started broker=mqtts://... store=file:///...

``COGBERT_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) and ``COGBERT_LOG_FORMAT`` (``json``,
``text`` or ``auto``: text when stderr is a terminal, JSON otherwise) choose both; arguments of
:func:`setup_logging` win over them. Field names mean one thing everywhere and always have one
type (``device`` a device id string, ``counter`` a release counter int, ...):
``tests/test_logs.py`` reads every :func:`event` call and holds them to that.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import TextIO

from cogbert_edge.errors import ConfigError

__all__ = ["setup_logging", "event", "JsonFormatter", "TextFormatter", "LEVELS", "FORMATS"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "json", "text")
# The keys every record has; an event field of the same name would overwrite them, so it is
# written with a trailing underscore instead (a bug in the call, but the record stays readable).
_RESERVED = frozenset({"time", "level", "logger", "message", "exc"})


def rfc3339(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 in UTC with milliseconds: ``2026-12-03T09:12:44.031Z``."""
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _fields(record: logging.LogRecord) -> dict:
    fields = getattr(record, "fields", None)
    if not isinstance(fields, dict):
        return {}
    return {(f"{k}_" if k in _RESERVED else k): v for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"time": rfc3339(record.created), "level": record.levelname.lower(),
                                  "logger": record.name, "message": record.getMessage()}
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """One readable line a record (a traceback, if any, on the lines after it)."""

    def format(self, record: logging.LogRecord) -> str:
        t = dt.datetime.fromtimestamp(record.created, dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
        parts = [f"{t} {record.levelname:<5} {record.name}  {record.getMessage()}"]
        for k, v in _fields(record).items():
            if k == "event":
                continue
            s = v if isinstance(v, str) else json.dumps(v, default=str)
            # Quote values a reader would otherwise split in the wrong place.
            parts.append(f"{k}={json.dumps(s) if (not s or ' ' in s or '=' in s) else s}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when logging was set
    up: a host (pytest, a notebook) may swap and close the stream it held at that time."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def setup_logging(level: str | None = None, fmt: str | None = None, stream: TextIO | None = None) -> None:
    """Send every ``cogbert.*`` log to ``stream`` (stderr). ``level`` and ``fmt`` default to
    ``COGBERT_LOG_LEVEL`` (INFO) and ``COGBERT_LOG_FORMAT`` (auto); a bad value is a
    :class:`~cogbert_edge.errors.ConfigError` naming the variable."""
    lvl = (level or os.environ.get("COGBERT_LOG_LEVEL") or "INFO").upper()
    if lvl not in LEVELS:
        src = "level" if level else "COGBERT_LOG_LEVEL"
        raise ConfigError(f"{src}={lvl!r}: expected one of {', '.join(LEVELS)}")
    form = (fmt or os.environ.get("COGBERT_LOG_FORMAT") or "auto").lower()
    if form not in FORMATS:
        src = "format" if fmt else "COGBERT_LOG_FORMAT"
        raise ConfigError(f"{src}={form!r}: expected one of {', '.join(FORMATS)}")
    if form == "auto":
        isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
        form = "text" if callable(isatty) and isatty() else "json"
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(TextFormatter() if form == "text" else JsonFormatter())
    root = logging.getLogger("cogbert")
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    root.propagate = False


def event(logger: logging.Logger, name: str, /, level: int = logging.INFO, **fields: object) -> None:
    """Log event ``name`` with ``fields`` (never pass secrets here). ``name`` is the record's
    ``message`` and its ``event`` field."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": {"event": name, **fields}})
