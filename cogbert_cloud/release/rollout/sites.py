"""Site-consistent rollouts of multi-agent releases: a canary stage is a set of whole sites, every
agent of a site installs the same site release, and a rollback applies to the whole site.

A site release (``signing.create_site_release``) carries every role's bundle hash in one signed
manifest; each agent's update agent installs its own role's bundle from it (``UpdateSettings.role``).
:class:`SiteRollout` offers it to every agent of the chosen sites (the bundle of the agent's role
as MQTT chunks), follows the agents' status reports, and judges a site:

* ``installed``: every agent of the site runs the release (trial or committed);
* ``failed``: some agent rejected it or rolled back; the whole site is then rolled back with the
  pre-signed rollback release (a higher counter, the previous bundles), even its agents that
  installed fine, so no site ever runs a mix of releases;
* ``pending``: not every agent has answered yet.

:func:`canary_sites` picks the canary stage: whole sites, never half a site.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

from cogbert_cloud.release.distribution import publish_release
from cogbert_edge.errors import ConfigError, WireError
from cogbert_edge.link.mqtt import Message, MqttLink
from cogbert_edge.wire.messages import StatusReport
from cogbert_edge.wire.topics import PREFIX, check_fleet

__all__ = ["SiteRelease", "SiteRollout", "canary_sites"]


@dataclass(frozen=True)
class SiteRelease:
    counter: int
    manifest: bytes                 # the signed site manifest
    bundles: dict[str, bytes]       # role -> bundle bytes


def canary_sites(sites: list[str], fraction: float, *, minimum: int = 1) -> list[str]:
    """The first ``max(minimum, round(fraction * len(sites)))`` sites, in the given order (callers
    order them, e.g. by risk); whole sites only."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"the canary fraction must be in (0, 1], got {fraction}")
    n = min(len(sites), max(minimum, round(fraction * len(sites))))
    return list(sites[:n])


@dataclass
class _SiteState:
    counter: int | None = None
    release: SiteRelease | None = None
    offered_at: float = 0.0
    manifest_sha256: str = ""
    reports: dict[str, StatusReport] = field(default_factory=dict)


class SiteRollout:
    """``sites`` maps a site to its agents and their roles (``{site: {device: role}}``); ``link`` is a
    connected link of a service with the rollout role (it writes release topics, reads status)."""

    def __init__(self, link: MqttLink, fleet: str, sites: dict[str, dict[str, str]], *,
                 root_chain: list[bytes] | None = None) -> None:
        self.link, self.fleet = link, check_fleet(fleet)
        seen: dict[str, str] = {}
        for site, members in sites.items():
            if not members:
                raise ConfigError(f"site {site!r} has no agents")
            for d in members:
                if d in seen:
                    raise ConfigError(f"device {d!r} is in two sites ({seen[d]!r} and {site!r})")
                seen[d] = site
        self.sites = sites
        self.site_of = seen
        self.root_chain = root_chain or []
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self.state = {s: _SiteState() for s in sites}
        self.audit: list[dict] = []

    def start(self, timeout: float = 10.0) -> SiteRollout:
        self.link.subscribe(f"{PREFIX}/{self.fleet}/+/status", self._on_status).wait(timeout)
        return self

    def _on_status(self, m: Message) -> None:
        device = m.topic.split("/")[-2]
        site = self.site_of.get(device)
        if site is None:
            return
        try:
            report = StatusReport.decode(m.payload)
        except WireError:
            return
        with self._cv:
            st = self.state[site]
            if st.counter is None:
                return
            # A manifest the update agent could not verify is reported without a counter but with
            # the manifest's hash, which names the offer it answers. (From an agent too old to send
            # the hash, a rejection after this site's offer is taken as that offer's; device clocks
            # in NTP sync.) "rejected:rollback" is a stale offer of an older release, never the
            # current one's failure.
            answers_offer = (report.manifest == st.manifest_sha256 if report.manifest
                             else report.time >= st.offered_at)
            unattributed = (report.counter is None and report.failed and report.reason != "rollback"
                            and answers_offer)
            if report.counter != st.counter and not unattributed:
                return
            if report.kind == "rejected" and report.reason == "busy" and st.release is not None:
                # The agent is finishing another update's trial: offer it again shortly.
                release, role = st.release, self.sites[site][device]
                threading.Timer(0.5, lambda: self._reoffer(site, device, role, release)).start()
                return
            st.reports[device] = report
            self._cv.notify_all()

    def _reoffer(self, site: str, device: str, role: str, release: SiteRelease) -> None:
        with self._lock:
            current = self.state[site].release is release
        if current:         # unless the site moved on to another release meanwhile
            self._offer_one(device, role, release)

    def _offer_one(self, device: str, role: str, release: SiteRelease) -> None:
        publish_release(self.link, self.fleet, release.manifest, bundle=release.bundles[role], device=device,
                        root_chain=self.root_chain)

    def offer(self, site: str, release: SiteRelease) -> None:
        """Offer ``release`` to every agent of ``site`` (each gets its role's bundle)."""
        members = self.sites[site]
        missing = sorted({r for r in members.values()} - set(release.bundles))
        if missing:
            raise ConfigError(f"release {release.counter} has no bundle for the roles {missing} of site {site!r}")
        with self._cv:
            self.state[site] = _SiteState(counter=release.counter, release=release, offered_at=time.time(),
                                          manifest_sha256=hashlib.sha256(release.manifest).hexdigest())
        for device, role in members.items():
            self._offer_one(device, role, release)
        self.audit.append({"site": site, "action": "offer", "counter": release.counter, "devices": sorted(members),
                           "time": time.time()})

    def verdict(self, site: str) -> str:
        with self._lock:
            return self._verdict(site)

    def _verdict(self, site: str) -> str:
        st = self.state[site]
        reports = st.reports
        if any(r.failed for r in reports.values()):
            return "failed"
        if set(reports) == set(self.sites[site]) and all(r.installed for r in reports.values()):
            return "installed"
        return "pending"

    def wait(self, site: str, timeout: float, *, until: tuple[str, ...] = ("installed", "failed")) -> str:
        deadline = time.monotonic() + timeout
        with self._cv:
            while (v := self._verdict(site)) not in until:
                left = deadline - time.monotonic()
                if left <= 0:
                    return v
                self._cv.wait(left)
            return v

    def stage(self, sites: list[str], release: SiteRelease, rollback: SiteRelease, *,
              timeout: float = 60.0) -> dict[str, str]:
        """Offer ``release`` to ``sites`` (whole sites); a site that fails is rolled back as a whole.
        Returns each site's outcome: ``installed``, ``rolled_back`` or ``pending`` (no verdict in time)."""
        for s in sites:
            self.offer(s, release)
        out = {}
        for s in sites:
            v = self.wait(s, timeout)
            if v == "failed":
                self.roll_back(s, rollback, timeout=timeout)
                out[s] = "rolled_back"
            else:
                out[s] = v
        return out

    def roll_back(self, site: str, rollback: SiteRelease, *, timeout: float = 60.0) -> str:
        """Every agent of ``site`` installs ``rollback``; returns the site's verdict on it."""
        self.audit.append({"site": site, "action": "rollback", "counter": rollback.counter, "time": time.time()})
        self.offer(site, rollback)
        return self.wait(site, timeout)

    def reports(self, site: str) -> dict[str, StatusReport]:
        with self._lock:
            return dict(self.state[site].reports)
