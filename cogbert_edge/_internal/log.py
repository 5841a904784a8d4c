"""Structured logs: one JSON object a line, with the device, release or batch they concern."""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["setup_logging", "event"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    """Send every ``cogbert.*`` log to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("cogbert")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def event(logger: logging.Logger, name: str, /, level: int = logging.INFO, **fields: object) -> None:
    """Log event ``name`` with ``fields`` (never pass secrets here)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": {"event": name, **fields}})


