"""Settings of the decision service: defaults, then ``COGBERT_DECIDE_*`` variables, then flags
(``cogbert_edge.config``, as every Cogbert service)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cogbert_edge.errors import ConfigError

__all__ = ["DecideSettings", "ENV_PREFIX"]

ENV_PREFIX = "DECIDE_"


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class DecideSettings:
    # What to serve: a signed release, verified against the fleet's trust root at start.
    trust_root: Path | None = field(default=None, metadata=_h("root.json of the fleet's release keys"))
    manifest: Path | None = field(default=None, metadata=_h("the signed release manifest to boot with"))
    bundle: Path | None = field(default=None, metadata=_h("the bundle that manifest names"))
    fleet: str = "default"
    model_name: str = field(default="cogbert", metadata=_h("the model name releases must carry"))
    backend: str | None = field(default=None, metadata=_h("native, numpy or mlx; default: COGBERT_BACKEND or auto"))
    # Who this replica is in the fleet: its lanes' device ids (certificates in pki/devices/ID/).
    lanes: tuple[str, ...] = field(default=("decide-0",), metadata=_h(
        "this replica's lanes: device ids of the fleet PKI, unique per replica; sessions hash onto them"))
    spool: Path = field(default=Path("decide-spool"), metadata=_h("lanes' outboxes and update state"))
    broker: str | None = field(default=None, metadata=_h("the broker's device listener (mqtts://...); "
                                                           "unset: decisions are spooled, not uploaded"))
    pki: Path | None = field(default=None, metadata=_h("PKI directory with the lanes' device identities"))
    reward_delay: int = field(default=0, metadata=_h("decisions a reward may still reach after the next one"))
    snapshot_every: int = 64
    telemetry_interval: float = 10.0
    trial_decisions: int = field(default=200, metadata=_h("decisions a new release's trial lasts at least"))
    trial_seconds: float = field(default=5.0, metadata=_h("seconds a new release's trial lasts at least"))
    # Clients and state tokens.
    clients: Path | None = field(default=None, metadata=_h("the clients file (`cogbert cloud decide token`)"))
    state_keys: str = field(default="", metadata=_h("state-token key ring ID:HEX,... (signing key first); "
                                                      "the same on every replica"))
    token_max_age: float = 7 * 24 * 3600.0
    # Batching, deadlines, bounds.
    max_batch: int = 256
    max_wait_us: int = field(default=0, metadata=_h("longest wait for a batch to fill; 0 flushes what the "
                                                      "event loop read in one iteration"))
    deadline_ms: float = field(default=100.0, metadata=_h("a decision not started by then gets the fallback or 503"))
    fallback_action: int | None = field(default=None, metadata=_h("the action served past a deadline; unset: 503"))
    max_queue: int = field(default=8192, metadata=_h("decisions waiting; beyond, 503 with Retry-After"))
    max_body_bytes: int = 1 << 20
    max_items: int = field(default=512, metadata=_h("decisions in one request or WebSocket message"))
    session_cache_bytes: int = 256 << 20
    session_idle_seconds: float = 600.0
    ws_max_inflight: int = field(default=2048, metadata=_h("decisions in flight per WebSocket before it stops "
                                                             "reading"))
    # Transport.
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: Path | None = None
    tls_key: Path | None = None
    graceful_seconds: float = field(default=20.0, metadata=_h("how long a shutdown waits for in-flight requests"))

    def __post_init__(self) -> None:
        if not self.lanes:
            raise ConfigError("a replica needs at least one lane (a device id of the fleet)")
        if self.max_batch < 1 or self.max_queue < 1 or self.max_items < 1 or self.max_body_bytes < 256:
            raise ConfigError("max_batch, max_queue and max_items must be >= 1, max_body_bytes >= 256")
        if self.max_wait_us < 0 or self.deadline_ms <= 0:
            raise ConfigError("max_wait_us must be >= 0 and deadline_ms > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        if len(set(self.lanes)) != len(self.lanes):
            raise ConfigError("lane ids must be distinct")
