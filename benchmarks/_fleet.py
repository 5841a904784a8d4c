"""The fleet every networked benchmark starts from: a fresh PKI (the broker's certificate for
localhost, the given service and device identities) and a mutual-TLS Mosquitto on loopback."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker
from cogbert_cloud.fleet.pki import PKI


@contextmanager
def local_fleet(root: Path, *, services: Iterable[str] = (), devices: Iterable[str] = (),
                fleet: str = "bench", config: BrokerConfig | None = None) -> Iterator[tuple[PKI, LocalBroker]]:
    pki = PKI.init(root / "pki")
    pki.issue_server(["localhost"])
    for s in services:
        pki.issue_service(s)
    for d in devices:
        pki.issue_device(d, fleet=fleet)
    (root / "broker").mkdir()
    with LocalBroker(pki.root, root / "broker", config=config) as broker:
        yield pki, broker
