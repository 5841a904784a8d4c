"""``cogbert fleet``: the operator API from a terminal.

    cogbert fleet devices [--tag T] [--json]
    cogbert fleet releases [--json]
    cogbert fleet rollout start CANDIDATE [--tag T] [--max-error-rate X ...] [--json]
    cogbert fleet rollout status [--json]
    cogbert fleet rollout pause | resume [--json]
    cogbert fleet rollout abort [--reason TEXT] [--json]

Where the API is and the token to call it with, first found wins: ``--api`` / ``--token``, then
``COGBERT_API_URL`` / ``COGBERT_API_TOKEN``, then the ``[api]`` section (``url``, ``token``) of
the config file (``--config``, ``COGBERT_API_CONFIG``, or ``~/.config/cogbert/api.ini``). The
URL defaults to http://localhost:8080 (a ``kubectl port-forward``).

Tables are for people; ``--json`` prints what the API returned, for scripts. The API's refusals
(an unknown token, a read token that tries to operate, no rollout to abort, a bad threshold)
are one line on stderr and exit 2; an API that cannot be reached is exit 2 too. Only the
standard library is used, so this works wherever the ``cogbert`` command does.
"""

from __future__ import annotations

import argparse
import configparser
import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cogbert_cloud.errors import OperatorApiError

__all__ = ["register", "ApiClient"]

DEFAULT_URL = "http://localhost:8080"
# The per-rollout abort thresholds a start request may set (names as in RolloutSettings).
THRESHOLDS: dict[str, tuple[type, str]] = {
    "max_install_failure_rate": (float, "share of offered devices that fail or do not report the install"),
    "max_error_rate": (float, "canary error rate above which the rollout aborts"),
    "max_nan_rate": (float, "canary NaN/Inf output rate above which it aborts"),
    "latency_factor": (float, "canary p95 may be this many times the control's (plus the slack)"),
    "latency_slack_us": (float, "... plus this many microseconds"),
    "reward_alpha": (float, "level of the one-sided reward test (canary worse than control)"),
    "stage_seconds": (float, "observation time before each stage is analysed"),
    "stage_timeout": (float, "a stage still short of data after this many seconds aborts"),
    "report_timeout": (float, "an offered device silent this long counts as an install failure"),
}


class ApiClient:
    """A small client for the operator API (urllib, bearer token)."""

    def __init__(self, url: str, token: str, timeout: float = 15.0) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json",
                                              **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise OperatorApiError(f"{method} {path}: {e.code} {_detail(e)}", status=e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise OperatorApiError(f"cannot reach the operator API at {self.url}: {reason} (set --api or "
                                   "COGBERT_API_URL)") from None
        except ValueError:
            raise OperatorApiError(f"{method} {path}: the answer is not JSON (is {self.url} the operator "
                                   "API?)") from None


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        d = json.loads(e.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        return e.reason or ""
    if isinstance(d, list):      # a validation error: where and what
        return "; ".join(f"{'.'.join(map(str, x.get('loc', [])[1:]))}: {x.get('msg', '')}" for x in d[:5])
    return str(d)


def _settings(a: argparse.Namespace) -> tuple[str, str]:
    cfg_path = Path(a.config or os.environ.get("COGBERT_API_CONFIG") or Path.home() / ".config/cogbert/api.ini")
    file_url = file_token = None
    if cfg_path.exists():
        cp = configparser.ConfigParser()
        try:
            cp.read(cfg_path)
        except configparser.Error as e:
            raise OperatorApiError(f"{cfg_path}: {str(e).splitlines()[0]}") from None
        file_url, file_token = cp.get("api", "url", fallback=None), cp.get("api", "token", fallback=None)
    elif a.config:
        raise OperatorApiError(f"{cfg_path}: no such config file")
    url = a.api or os.environ.get("COGBERT_API_URL") or file_url or DEFAULT_URL
    token = a.token or os.environ.get("COGBERT_API_TOKEN") or file_token
    if not token:
        raise OperatorApiError("no API token: pass --token, set COGBERT_API_TOKEN, or put token = ... in the [api] "
                               f"section of {cfg_path} (cogbert cloud token makes one)")
    if not url.startswith(("http://", "https://")):
        raise OperatorApiError(f"--api {url!r}: expected an http:// or https:// URL")
    return url, token


# -- output ---------------------------------------------------------------------------------


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _ago(t: float | None) -> str:
    if not t:
        return "never"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s ago" if s < 90 else f"{s / 60:.0f}m ago" if s < 5400 else f"{s / 3600:.1f}h ago"


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else ""


def _devices_table(devices: list[dict]) -> str:
    rows = []
    for d in devices:
        t = d.get("telemetry") or {}
        p95 = t.get("latency_p95_us")
        rows.append([d["device"], ",".join(d.get("tags") or []), d.get("release"), _ago(d.get("last_seen")),
                     d.get("outbox_pending"), f"{p95:.0f}us" if isinstance(p95, (int, float)) else "",
                     t.get("decisions"), t.get("errors"), d.get("last_status") or ""])
    return table(rows, ["DEVICE", "TAGS", "RELEASE", "LAST SEEN", "OUTBOX", "P95", "DECISIONS", "ERRORS", "STATUS"])


def _releases_table(releases: list[dict]) -> str:
    rows = []
    for r in sorted(releases, key=lambda r: r["counter"]):
        ev = r.get("evaluation") or {}
        gate = ev.get("decision") or ev.get("verdict") or ("; ".join(f"{k}={v}" for k, v in list(ev.items())[:3])
                                                           if ev else "")
        rows.append([r["counter"], r["state"], r.get("model_id") or "", r.get("parent_release") or "",
                     r.get("quant") or "", r.get("created") or "", gate])
    return table(rows, ["RELEASE", "STATE", "MODEL", "FROM", "QUANT", "CREATED", "GATE"])


def _rollout_text(r: dict | None, history: list[dict] | None = None) -> str:
    if not r:
        return "no rollout since the service started"
    out = [f"rollout of release {r['candidate']} (stable {r.get('stable')}): {r['state']}, stage {r.get('stage')}"
           + (f", tag {r['tag']}" if r.get("tag") else ""),
           f"  started {_when(r.get('started'))}, stage started {_when(r.get('stage_started'))}, "
           f"offered to {len(r.get('offered') or {})} devices"]
    if r.get("result"):
        out.append(f"  result: {r['result']}")
    for reason in r.get("reasons") or []:
        out.append(f"  reason: {reason}")
    for s in r.get("timeline") or []:
        m = s.get("metrics") or {}
        keys = ("installed", "offered", "canary_decisions", "control_decisions", "error_rate", "reward_p")
        summary = " ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys if k in m)
        out.append(f"  stage {s['stage']} ({s.get('pct')}%) {s['verdict']} at {_when(s.get('time'))}: {summary}")
        out += [f"    {x}" for x in s.get("reasons") or []]
    if history:
        earlier = [f"{h['candidate']} {h.get('result') or h.get('state')}" for h in history[-5:]]
        out.append("earlier: " + ", ".join(earlier))
    return "\n".join(out)


# -- commands -------------------------------------------------------------------------------


def _print(a: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=None if a.json else 1) if a.json else text)
    return 0


def devices(a: argparse.Namespace) -> int:
    c = ApiClient(*_settings(a))
    ds = c.call("GET", "/v1/devices")
    if a.tag:
        ds = [d for d in ds if a.tag in (d.get("tags") or [])]
    return _print(a, ds, _devices_table(ds))


def releases(a: argparse.Namespace) -> int:
    rs = ApiClient(*_settings(a)).call("GET", "/v1/releases")
    return _print(a, rs, _releases_table(rs))


def rollout(a: argparse.Namespace) -> int:
    c = ApiClient(*_settings(a))
    if a.action == "status":
        r = c.call("GET", "/v1/rollouts")
        return _print(a, r, _rollout_text(r.get("current"), r.get("history")))
    if a.action == "start":
        if a.candidate is None:
            raise OperatorApiError("rollout start needs the candidate release: cogbert fleet rollout start N")
        body: dict[str, Any] = {"candidate": a.candidate}
        if a.tag:
            body["tag"] = a.tag
        body.update({k: getattr(a, k) for k in THRESHOLDS if getattr(a, k) is not None})
        r = c.call("POST", "/v1/rollouts", body)
    elif a.action == "abort":
        r = c.call("POST", "/v1/rollouts/current/abort", {"reason": a.reason})
    else:
        r = c.call("POST", f"/v1/rollouts/current/{a.action}")
    return _print(a, r, _rollout_text(r))


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=None, help=f"operator API URL (COGBERT_API_URL; default {DEFAULT_URL})")
    common.add_argument("--token", default=None, help="bearer token (COGBERT_API_TOKEN)")
    common.add_argument("--config", default=None, help="INI file with an [api] section: url, token "
                                                       "(COGBERT_API_CONFIG; default ~/.config/cogbert/api.ini)")
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    fleet = sub.add_parser("fleet", help="operate the fleet through the operator API: devices, releases, rollouts")
    fsub = fleet.add_subparsers(dest="fleet_cmd", required=True, metavar="COMMAND")
    d = fsub.add_parser("devices", parents=[common], help="every device: release, last seen, outbox, latency, errors")
    d.add_argument("--tag", default=None, help="only devices with this tag")
    d.set_defaults(func=devices)
    r = fsub.add_parser("releases", parents=[common], help="the registry: state, lineage, gate results")
    r.set_defaults(func=releases)
    ro = fsub.add_parser("rollout", parents=[common], help="start, inspect, pause, resume or abort the rollout")
    ro.add_argument("action", choices=("start", "status", "pause", "resume", "abort"))
    ro.add_argument("candidate", nargs="?", type=int, default=None, help="start: the candidate release's counter")
    ro.add_argument("--reason", default="operator (cogbert fleet rollout abort)", help="abort: why (audit log)")
    ro.add_argument("--tag", default=None, help="start: offer the candidate only to devices with this tag")
    for name, (kind, text) in THRESHOLDS.items():
        ro.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                        help=f"start: {text} (default: cloud serve's setting)")
    ro.set_defaults(func=rollout)
