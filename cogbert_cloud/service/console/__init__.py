"""The web console: the fleet, releases, the current rollout and the audit log in a browser,
served by the operator API itself (``GET /console``).

It is a static page and one script without a build step or anything fetched from elsewhere at
run time: the page asks for a bearer token, keeps it in the tab's ``sessionStorage`` (gone when
the tab closes), and calls the same ``/v1`` endpoints as ``curl`` or ``cogbert fleet`` with it.
So the console has exactly the API's authorization: a ``read`` token sees everything, an
``operate`` token can also pause, resume and abort the rollout (after a confirmation), and the
static files themselves hold no data. It adds two read endpoints to the API:

    GET /v1/whoami                     the caller's role ("read" or "operate")      read
    GET /v1/audit?limit=N              the newest N audit entries, newest first      read
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, RedirectResponse, Response

__all__ = ["mount"]

_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# The page loads only its own script and style: no inline script, nothing from another origin.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath("static").joinpath(name).read_bytes()


def mount(app: FastAPI, cp: Any, need: Any) -> None:
    """Add the console's page, its two files and its two read endpoints to ``app``. ``need``
    is the API's role dependency factory (``need("read")``)."""
    page = _read("index.html")
    files = {name: _read(name) for name in _STATIC}
    headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
               "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console")

    @app.get("/console", include_in_schema=False)
    def console() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @app.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in files:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(files[name], media_type=_STATIC[name], headers=headers)

    @app.get("/v1/whoami")
    def whoami(role: str = need("read")) -> dict:
        return {"role": role}

    @app.get("/v1/audit", dependencies=[need("read")])
    def audit(limit: int = Query(default=100, ge=1, le=1000)) -> list[dict]:
        store = cp.registry.audit.store
        # Keys sort by time: list them, read only the newest `limit` objects.
        newest = sorted(store.list("audit/"))[-limit:]
        return [json.loads(store.get(k)) for k in reversed(newest)]
