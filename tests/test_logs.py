"""Logs: RFC 3339 timestamps and a ``message`` in the JSON lines, a readable line on a terminal,
``COGBERT_LOG_LEVEL`` / ``COGBERT_LOG_FORMAT``, and one name and one type per field across the
code base (read from the source: every ``event(...)`` call and every ``extra={"fields": ...}``)."""

from __future__ import annotations

import ast
import datetime as dt
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cogbert_edge._internal.log import event, setup_logging
from cogbert_edge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Every field a log event may carry, with its one type. A new field is added here on purpose:
# that is the moment to check it is not another name for a field that exists (``device_id``
# for ``device``, ``err`` for ``error``) and that it has the same type where it is the same thing.
# "number" accepts int and float (a duration rounded to 0.1 ms is still a duration).
FIELDS: dict[str, str] = {
    "all_drained": "bool", "attempt": "int", "batch": "str", "broker": "str", "buffered_bytes": "int",
    "bytes": "int", "ca_serial": "str", "callback": "str", "check_ms": "number", "connects": "int",
    "counter": "int", "cut_bytes": "int", "device": "str", "devices": "int", "download_ms": "number",
    "dropped_oldest": "int", "dropped_unwritten": "int", "error": "str", "fleet": "str", "group": "str",
    "injected": "int", "kept_bytes": "int", "kind": "str", "link": "str", "logged": "int", "loop": "bool",
    "method": "str", "metrics_port": "int", "model": "str", "name": "str", "not_after": "str", "path": "str",
    "pid": "int", "port": "int", "reason": "str", "reasons": "list", "records": "int", "root": "str",
    "segment": "str", "seq": "int", "serial": "str", "serials": "list", "service_port": "int",
    "session_present": "bool", "store": "str", "stored_parts": "list", "topic": "str", "topic_filter": "str",
    "write_ms": "number",
    # rollout and audit events (release/rollout)
    "actor": "str", "candidate": "int", "stable": "int", "stage": "int", "verdict": "str", "metrics": "dict",
    "rollback_published": "bool",
    # the update agent and the decision service
    "status": "str", "detail": "str", "lane": "str", "lanes": "list", "last_seqs": "dict",
    # operations (console, tracing, operator CLI)
    "trace_id": "str", "span_id": "str", "url": "str", "tag": "str", "tags": "list",
}
# Names that must not appear: each is a synonym of a field above, or a key every record has.
SYNONYMS = {"device_id": "device", "dev": "device", "err": "error", "exc": "error", "msg": "message",
            "ts": "time", "timestamp": "time", "release": "counter", "release_counter": "counter",
            "bytes_len": "bytes", "size": "bytes"}
RESERVED = {"time", "level", "logger", "message", "event"}


def _kind(e: ast.expr) -> str | None:
    """The type of an expression where the source alone tells it; None where it does not."""
    if isinstance(e, ast.Constant):
        v = e.value
        return ("bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float)
                else "str" if isinstance(v, str) else None)
    if isinstance(e, ast.JoinedStr):
        return "str"
    if isinstance(e, (ast.List, ast.ListComp, ast.Tuple)):
        return "list"
    if isinstance(e, (ast.Dict, ast.DictComp)):
        return "dict"
    if isinstance(e, ast.Compare) or (isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not)):
        return "bool"
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name):
        return {"str": "str", "repr": "str", "len": "int", "int": "int", "float": "float", "bool": "bool",
                "list": "list", "sorted": "list", "dict": "dict", "round": "float"}.get(e.func.id)
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Attribute) and e.func.attr in ("isoformat", "hex"):
        return "str"
    if isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Slice):
        return _kind(e.value)
    return None


def _log_fields() -> list[tuple[str, str | None, str]]:
    """(field, inferred type or None, where) for every field of every log call in the packages."""
    out = []
    files = [p for d in ("cogbert_edge", "cogbert_cloud", "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            fname = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if fname == "event":
                out += [(k.arg, _kind(k.value), where) for k in node.keywords if k.arg and k.arg != "level"]
            for k in node.keywords:
                # log.exception(..., extra={"fields": {...}})
                if k.arg == "extra" and isinstance(k.value, ast.Dict):
                    for key, val in zip(k.value.keys, k.value.values, strict=True):
                        if isinstance(key, ast.Constant) and key.value == "fields" and isinstance(val, ast.Dict):
                            out += [(str(fk.value), _kind(fv), where)
                                    for fk, fv in zip(val.keys, val.values, strict=True)
                                    if isinstance(fk, ast.Constant) and fk.value != "event"]
    return out


def test_every_log_field_has_one_registered_name_and_type():
    fields = _log_fields()
    assert len(fields) > 60, "the scan found too few log calls: it no longer reads them"
    unknown = sorted({f"{name} ({where})" for name, _, where in fields if name not in FIELDS})
    assert not unknown, f"fields not in FIELDS (add them, or use the existing name): {unknown}"
    synonyms = sorted({f"{name} -> {SYNONYMS[name]} ({where})" for name, _, where in fields if name in SYNONYMS})
    assert not synonyms, synonyms
    assert not RESERVED & {n for n, _, _ in fields}, "a field may not take the name of a key every record has"
    wrong = []
    for name, kind, where in fields:
        want = FIELDS.get(name)
        if kind is None or want is None:
            continue
        if not (kind == want or (want == "number" and kind in ("int", "float"))):
            wrong.append(f"{name}: {kind}, registered as {want} ({where})")
    assert not wrong, wrong


def test_the_scan_catches_a_synonym_and_a_wrong_type(tmp_path):
    # The check above would pass on an empty scan: show that it reads a call as written.
    src = 'event(log, "x", device_id="a", counter=str(3), error=str(e)[:20])'
    stmt = ast.parse(src).body[0]
    assert isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
    call = stmt.value
    got = {k.arg: _kind(k.value) for k in call.keywords}
    assert got == {"device_id": "str", "counter": "str", "error": "str"}
    assert "device_id" in SYNONYMS and FIELDS["counter"] == "int"


def _json_lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_have_rfc3339_time_and_message(monkeypatch):
    monkeypatch.delenv("COGBERT_LOG_LEVEL", raising=False)
    monkeypatch.delenv("COGBERT_LOG_FORMAT", raising=False)
    buf = io.StringIO()      # not a terminal: auto means JSON
    setup_logging(stream=buf)
    log = logging.getLogger("cogbert.test")
    event(log, "batch_stored", device="press-7", counter=3, bytes=120)
    log.warning("plain %s", "words")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"fields": {"event": "step_failed", "device": "press-7"}})
    a, b, c = _json_lines(buf)
    t = dt.datetime.fromisoformat(a["time"].replace("Z", "+00:00"))
    assert a["time"].endswith("Z") and t.tzinfo is not None
    assert abs((dt.datetime.now(dt.timezone.utc) - t).total_seconds()) < 60
    assert a == {**a, "level": "info", "logger": "cogbert.test", "message": "batch_stored", "event": "batch_stored",
                 "device": "press-7", "counter": 3, "bytes": 120}
    assert b["message"] == "plain words" and b["level"] == "warning" and "event" not in b
    assert c["message"] == "failed" and c["event"] == "step_failed" and "ValueError: boom" in c["exc"]


def test_a_field_named_like_a_record_key_does_not_overwrite_it():
    buf = io.StringIO()
    setup_logging("INFO", "json", stream=buf)
    event(logging.getLogger("cogbert.test"), "x", time="yesterday", message="hello")
    (rec,) = _json_lines(buf)
    assert rec["message"] == "x" and rec["time"].endswith("Z")
    assert rec["time_"] == "yesterday" and rec["message_"] == "hello"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_readable_line(monkeypatch):
    monkeypatch.delenv("COGBERT_LOG_FORMAT", raising=False)
    buf = _Tty()
    setup_logging("INFO", stream=buf)
    event(logging.getLogger("cogbert.ingest"), "ingest_started", broker="mqtts://b:8884", group="ingest",
          reason="two words", metrics_port=0)
    (line,) = buf.getvalue().splitlines()
    hh, rest = line.split(" ", 1)
    assert len(hh) == len("09:12:44.031") and hh[2] == ":" and hh[8] == "."
    assert rest == ('INFO  cogbert.ingest  ingest_started broker=mqtts://b:8884 group=ingest '
                    'reason="two words" metrics_port=0')


def test_environment_chooses_level_and_format(monkeypatch):
    monkeypatch.setenv("COGBERT_LOG_LEVEL", "warning")
    monkeypatch.setenv("COGBERT_LOG_FORMAT", "text")
    buf = io.StringIO()
    setup_logging(stream=buf)
    log = logging.getLogger("cogbert.test")
    event(log, "hidden")
    event(log, "shown", level=logging.WARNING, device="d1")
    (line,) = buf.getvalue().splitlines()
    assert "WARNING cogbert.test  shown device=d1" in line
    # An argument wins over the environment.
    buf2 = io.StringIO()
    setup_logging("DEBUG", "json", stream=buf2)
    event(log, "now_shown", level=logging.DEBUG)
    assert _json_lines(buf2)[0]["message"] == "now_shown"


@pytest.mark.parametrize("var,value", [("COGBERT_LOG_LEVEL", "LOUD"), ("COGBERT_LOG_FORMAT", "xml")])
def test_a_bad_setting_is_a_config_error_naming_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        setup_logging(stream=io.StringIO())


def test_the_command_reports_a_bad_log_setting_in_one_line():
    env = {**os.environ, "COGBERT_LOG_FORMAT": "xml"}
    p = subprocess.run([sys.executable, "-m", "cogbert_cloud.cli", "pki", "list", "/nonexistent"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["cogbert: error: COGBERT_LOG_FORMAT='xml': expected one of auto, json, "
                                             "text"]


def test_the_command_writes_json_lines_with_rfc3339_when_not_a_terminal(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGBERT_LOG")}
    p = subprocess.run([sys.executable, "-m", "cogbert_cloud.cli", "pki", "init", str(tmp_path / "pki")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stderr.splitlines() if x.startswith("{")]
    assert recs and all(r["time"].endswith("Z") and r["message"] for r in recs)
    assert any(r.get("event") == "pki_initialised" and isinstance(r["ca_serial"], str) for r in recs)
