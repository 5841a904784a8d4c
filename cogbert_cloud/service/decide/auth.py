"""Bearer tokens of the service's clients: stored hashed, scoped to a fleet, with a role and
per-token rate and size limits.

The tokens file (``--clients``) is JSON, written by ``cogbert decide token``::

    {"clients": [{"name": "web", "fleet": "plant", "role": "decide",
                  "sha256": "<hex digest of the secret>", "rate": 5000, "burst": 10000}]}

Only digests are stored: the file is not a secret, and the secret is shown once when the token
is made. The one role, ``decide``, may start sessions, decide, report rewards and end
sessions; it cannot do anything else (there is nothing else on this port but health, readiness
and metrics). ``rate`` is decisions per second, with bursts up to ``burst``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogbert_cloud.service.decide.errors import Forbidden, RateLimited, Unauthorized
from cogbert_edge.errors import ConfigError

__all__ = ["Client", "ClientRegistry", "make_token", "ROLES"]

ROLES = ("decide",)
PREFIX = "cbd_"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def make_token() -> str:
    """A new secret: 32 random bytes, URL-safe, with a prefix that secret scanners can match."""
    return PREFIX + secrets.token_urlsafe(32)


@dataclass
class Client:
    name: str
    fleet: str
    role: str
    sha256: str
    rate: float = 5000.0
    burst: float = 10000.0
    _tokens: float = field(default=-1.0, repr=False)
    _last: float = field(default=0.0, repr=False)

    def take(self, n: int) -> None:
        """Spend ``n`` decisions from the bucket, or raise RateLimited with when to retry."""
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if n > self._tokens:
            wait = (n - self._tokens) / self.rate
            raise RateLimited(f"client {self.name!r} is over its rate of {self.rate:g} decisions/s",
                              retry_after=max(1.0, wait))
        self._tokens -= n


class ClientRegistry:
    def __init__(self, clients: list[Client], fleet: str) -> None:
        self.fleet = fleet
        self._by_digest = {c.sha256: c for c in clients}

    @classmethod
    def load(cls, path: Path, fleet: str) -> ClientRegistry:
        try:
            doc = json.loads(Path(path).read_text())
            entries = doc["clients"]
            clients = [Client(str(e["name"]), str(e["fleet"]), str(e.get("role", "decide")), str(e["sha256"]).lower(),
                              float(e.get("rate", 5000)), float(e.get("burst", 10000))) for e in entries]
        except FileNotFoundError:
            raise ConfigError(f"clients file {path} does not exist; make one with `cogbert decide token`") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"clients file {path} is not valid: {e}") from None
        for c in clients:
            if c.role not in ROLES:
                raise ConfigError(f"client {c.name!r}: role {c.role!r} is not one of {ROLES}")
            if len(c.sha256) != 64:
                raise ConfigError(f"client {c.name!r}: sha256 must be 64 hex digits")
            if c.rate <= 0 or c.burst < 1:
                raise ConfigError(f"client {c.name!r}: rate must be > 0 and burst >= 1")
        return cls(clients, fleet)

    def authenticate(self, header: bytes | None) -> Client:
        if not header:
            raise Unauthorized("missing Authorization: Bearer <token>")
        scheme, _, secret = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("Authorization must be 'Bearer <token>'")
        d = digest(secret.strip())
        client = self._by_digest.get(d)
        # compare_digest on the found digest: the dict lookup is on a hash of the secret, so
        # its timing tells nothing about the secret itself.
        if client is None or not hmac.compare_digest(client.sha256, d):
            raise Unauthorized("unknown bearer token")
        if client.fleet != self.fleet:
            raise Forbidden(f"client {client.name!r} is scoped to fleet {client.fleet!r}, not {self.fleet!r}")
        return client


def add_client(path: Path, name: str, fleet: str, *, rate: float = 5000.0, burst: float = 10000.0) -> str:
    """Add (or replace) client ``name`` in the tokens file; returns the new secret."""
    secret = make_token()
    doc = json.loads(path.read_text()) if path.exists() else {"clients": []}
    doc["clients"] = [c for c in doc["clients"] if c.get("name") != name]
    doc["clients"].append({"name": name, "fleet": fleet, "role": "decide", "sha256": digest(secret),
                           "rate": rate, "burst": burst})
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return secret
