"""The update agent: verified, staged, trialled model updates that roll back by themselves.

A release arrives on the device's (or the fleet's retained) ``release`` topic as a
:class:`~cogbert_edge.wire.messages.ReleaseOffer`: the signed manifest, the root chain, and
where the bundle is (a ``file://`` or HTTP(S) URL, or :class:`~cogbert_edge.wire.messages.Chunk`
messages that follow). Nothing in the message but the signed manifest (and root chain) is
trusted; the bundle is checked against the manifest. The agent's persistent state is in
:mod:`~cogbert_edge.update.state`, the trial and golden check in :mod:`~cogbert_edge.update.trial`.

Install, step by step (``STEPS``), each leaving the device able to boot a verified model:

1. ``verify``   the manifest against the trusted root (:class:`~cogbert_edge.update.trust.TrustedState`):
                signatures, expiry, model and fleet, counter above the highest accepted, SDK;
2. ``download`` into ``staging/`` in the background, capped at the manifest's length, with a
                timeout and retries, after checking free space;
3. ``stage``    check length and sha256, load it strictly, check it fits this device (same
                observations and actions), move it into ``models/`` (atomic rename);
4. ``persist``  the new highest counter and "trial of X, last good Y" in ``state.json``
                (temp file, fsync, rename, fsync of the directory);
5. ``swap``     between two decisions (the decision path reads one reference; nothing waits);
6. ``trial``    for ``trial_decisions`` decisions and ``trial_seconds``: golden inputs (the
                bundle's ``x-golden`` outputs recomputed here), no NaN/Inf, decision latency
                against the previous model, error rate; then
7. ``commit``   (state: current = last good = X) or roll back to Y.

On boot, a trial still open in ``state.json`` means the device died during it: it boots the
last good model and reports ``rolled_back:crash_during_trial``. Statuses go to the device's
``status`` topic: ``installed``, ``trial``, ``committed``, ``rolled_back:<reason>``,
``rejected:<reason>``, ``already_installed``.

Recurrent state across a swap: a session's state is kept when the new model has the same
hidden size (it is the same architecture, retrained); otherwise the device resets it to the
new model's initial state at that session's next decision (``Device.state_resets`` counts).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import shutil
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogbert_edge import __version__
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge._internal.log import event
from cogbert_edge.errors import ConfigError, WireError
from cogbert_edge.inference.bundle import FORMAT_VERSION, BundleError, load_bundle
from cogbert_edge.inference.policy import Policy
from cogbert_edge.update.state import AgentState, InstalledModel
from cogbert_edge.update.trial import Trial, TrialLimits, golden_check, golden_outputs
from cogbert_edge.update.trust import Release, TrustedState, VerificationError
from cogbert_edge.wire.messages import Chunk, ReleaseOffer, StatusReport, decode_release_message

__all__ = ["UpdateAgent", "UpdateSettings", "STEPS", "golden_outputs"]

log = logging.getLogger("cogbert.update")
STEPS = ("verify", "download", "stage", "persist", "swap", "trial", "commit")
SDK_VERSION = tuple(int(x) for x in __version__.split("."))


@dataclass
class UpdateSettings:
    directory: Path | None = None      # a Device sets it to SPOOL/update
    model: str = "cogbert"
    fleet: str = "default"
    trial_decisions: int = 200
    trial_seconds: float = 5.0
    latency_factor: float = 3.0          # the trial's latency quantile may be at most this times the old model's ...
    latency_slack_us: float = 500.0      # ... plus this much
    max_error_rate: float = 0.01
    download_timeout: float = 30.0
    download_retries: int = 3
    golden_agreement: float = 0.9
    role: str | None = None              # a multi-agent site's role: install site releases' bundle for it

    @property
    def trial_limits(self) -> TrialLimits:
        return TrialLimits(self.trial_decisions, self.trial_seconds, self.latency_factor, self.latency_slack_us,
                           self.max_error_rate)


def _background(fn: Callable, *args: object) -> None:
    """Run install work on its own thread, so decisions never wait for it.

    The interpreter's switch interval is left alone: lowering it during installs (tried, to cut
    the GIL wait of a decision) did not lower the measured swap pause, and in a process hosting
    many devices it made 200 simultaneous installs take 10 s instead of 2 s."""
    threading.Thread(target=fn, args=args, daemon=True, name="cogbert-update").start()


def _open_url(url: str, timeout: float):
    """A readable stream for the bundle URL. A ``file://`` URL is opened directly: urllib's
    file handler builds MIME headers (parsing the system's mime.types on first use), which cost
    seconds of CPU when 200 simulated devices install at once."""
    if url.startswith("file://"):
        return open(urllib.request.url2pathname(urllib.parse.urlsplit(url).path), "rb")
    return urllib.request.urlopen(url, timeout=timeout)


class UpdateAgent:
    """Owns the device's model files and trust state. ``device`` must offer ``swap(policy)``,
    ``policy``, ``backend`` and ``report(StatusReport)``."""

    def __init__(self, settings: UpdateSettings, trusted_root: bytes, *, factory_bundle: Path,
                 backend: str | None = None, clock: Callable[[], dt.datetime] | None = None) -> None:
        if settings.directory is None:
            raise ConfigError("UpdateSettings.directory is not set: say where the update agent keeps its files")
        self.s = settings
        self.dir = Path(settings.directory)
        (self.dir / "models").mkdir(parents=True, exist_ok=True)
        (self.dir / "staging").mkdir(exist_ok=True)
        self.backend = backend
        self.clock = clock or (lambda: dt.datetime.now(dt.timezone.utc))
        self._lock = threading.Lock()
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._pending: dict[str, tuple[Release, int]] = {}    # sha -> (release, chunk count)
        self.statuses: list[StatusReport] = []
        self._report: Callable[[StatusReport], None] = lambda status: None
        self._swap: Callable[[Policy], None] = lambda policy: None
        self._busy = False              # a download or install in progress
        # Held across each read-modify-write of the persisted state: an install (update thread)
        # and a trial's commit (update thread) or rollback (decision thread) may overlap.
        self._state_lock = threading.Lock()
        # The newest URL offer that arrived while busy, installed when the work in progress ends:
        # the fleet's rollback is one retained message, and a device must not miss it.
        self._queued: tuple[Release, ReleaseOffer, Policy] | None = None
        self.trial: Trial | None = None
        # The running model's recent decision latencies (µs), set by the device at a swap.
        self.baseline_latency_us: np.ndarray | None = None
        self.factory_bundle = Path(factory_bundle)

        root_path = self.dir / "root.json"
        root = root_path.read_bytes() if root_path.exists() else trusted_root
        self.trust = TrustedState(root, now=self.clock())
        if not root_path.exists():
            atomic_write(root_path, root)
        self.state = AgentState.load(self.dir / "state.json")

    # -- boot -------------------------------------------------------------------------------

    def boot(self) -> tuple[Policy, str | None]:
        """The policy to start with, and a status to report (a trial cut short by a crash)."""
        note = None
        if self.state.trial is not None:
            note = "rolled_back:crash_during_trial"
            self._save_state(dataclasses.replace(self.state, trial=None))
        current = self.state.current
        if current is not None:
            try:
                data = (self.dir / "models" / f"{current.sha256}.safetensors").read_bytes()
                if hashlib.sha256(data).hexdigest() != current.sha256:
                    raise BundleError("stored model does not match its recorded hash")
                return Policy(load_bundle(data), self.backend), note
            except (OSError, BundleError) as e:
                event(log, "stored_model_unusable", level=logging.ERROR, error=str(e))
                note = "rolled_back:stored_model_unusable"
        return Policy(load_bundle(self.factory_bundle), self.backend), note

    def attach(self, *, swap: Callable[[Policy], None], report: Callable[[StatusReport], None]) -> None:
        self._swap, self._report = swap, report

    @property
    def highest_counter(self) -> int:
        return self.state.highest_counter

    @property
    def current_counter(self) -> int | None:
        """The release counter of the model the device boots (None: the factory model)."""
        return self.state.current.counter if self.state.current else None

    # -- messages ---------------------------------------------------------------------------

    def on_message(self, payload: bytes, current: Policy) -> None:
        """Handle a release or chunk message (from the link's thread): verification is quick,
        the rest runs on a worker thread so decisions never wait."""
        try:
            msg = decode_release_message(payload)
        except WireError as e:      # hostile bytes: report and ignore
            return self._status(None, "rejected:malformed", str(e))
        if isinstance(msg, Chunk):
            return self._on_chunk(msg)
        try:
            if self.trust.update_root_chain(list(msg.root_chain)):
                atomic_write(self.dir / "root.json", self.trust.root_bytes)
            release = self._verify(msg.manifest)
        except VerificationError as e:
            if e.reason == "rollback" and self._is_current(msg.manifest):
                return self._status(None, "already_installed", "this release is installed")
            # No counter can be trusted here: the manifest's hash says which offer this answers.
            return self._status(None, f"rejected:{e.reason}", str(e),
                                manifest=hashlib.sha256(msg.manifest).hexdigest())
        try:
            self._check_compatible(release, current)
        except VerificationError as e:
            # The manifest is signed and verified: its counter is the signer's, so the report names it
            # (a rollout must not take this rejection for that of a later offer).
            return self._status(release, f"rejected:{e.reason}", str(e))
        event(log, "release_offered", counter=release.counter, model=release.model)
        # A download or install in progress makes a URL offer wait for it (the newest one
        # only); chunks flow now or never, so a chunked offer is refused. A trial does not
        # make the agent busy: a newer verified release (the rollout's pre-signed rollback, say)
        # supersedes the model on trial, which is then never committed.
        with self._lock:
            if not self._busy:
                self._busy, outcome = True, "install"
            elif msg.chunks is not None:
                outcome = "refuse"
            else:
                outcome = "wait"
                if self._queued is None or release.counter > self._queued[0].counter:
                    self._queued = (release, msg, current)
        if outcome == "refuse":
            return self._status(release, "rejected:busy", "another update is in progress")
        if outcome == "wait":
            event(log, "release_queued", counter=release.counter, detail="after the update in progress")
            return
        if msg.chunks is not None:
            with self._lock:
                self._pending[release.sha256] = (release, msg.chunks)
                self._chunks.setdefault(release.sha256, {})
            self._maybe_assemble(release.sha256, current)
            return
        _background(self._install_from_url, release, msg, current)

    def _verify(self, manifest: bytes) -> Release:
        self.trust.now = self.clock()
        if self.s.role is not None:   # an agent of a site: only site releases, for its role
            release = self.trust.verify_site_release(manifest, role=self.s.role, model=self.s.model,
                                                     fleet=self.s.fleet, highest_counter=self.highest_counter,
                                                     sdk_format_version=FORMAT_VERSION, sdk_version=SDK_VERSION)
        else:
            release = self.trust.verify_release(manifest, model=self.s.model, fleet=self.s.fleet,
                                                highest_counter=self.highest_counter,
                                                sdk_format_version=FORMAT_VERSION, sdk_version=SDK_VERSION)
        self._crash_point("verify")
        return release

    @staticmethod
    def _check_compatible(release: Release, current: Policy) -> None:
        c, cfg = release.compat, current.config
        if (c["architecture"] != "lstm-ac" or c["obs_dim"] != cfg.obs_dim
                or c["action"] != {"kind": cfg.action.kind, "size": cfg.action.size}):
            raise VerificationError("incompatible", f"release needs obs {c['obs_dim']} and actions {c['action']}; "
                                                    f"this device provides obs {cfg.obs_dim}, actions "
                                                    f"{cfg.action.kind} {cfg.action.size}")

    def _is_current(self, manifest: bytes) -> bool:
        cur = self.state.current
        return cur is not None and hashlib.sha256(manifest).hexdigest() == cur.manifest_sha256

    # -- download ---------------------------------------------------------------------------

    def _on_chunk(self, msg: Chunk) -> None:
        sha, index, data = msg.sha256, msg.index, msg.data
        with self._lock:
            pending = self._pending.get(sha)
            if pending is None or not 0 <= index < pending[1]:
                return
            parts = self._chunks[sha]
            parts[index] = data
            if sum(map(len, parts.values())) > pending[0].length:     # endless data
                self._pending.pop(sha)
                self._chunks.pop(sha)
                release = pending[0]
            else:
                release = None
        if release is not None:
            self._status(release, "rejected:length_mismatch", "chunks exceed the stated length")
            return self._idle()
        self._maybe_assemble(sha, None)

    def _maybe_assemble(self, sha: str, current: Policy | None) -> None:
        with self._lock:
            pending = self._pending.get(sha)
            if pending is None or len(self._chunks.get(sha, {})) < pending[1]:
                return
            release, count = self._pending.pop(sha)
            parts = self._chunks.pop(sha)
        data = b"".join(parts[i] for i in range(count))
        _background(self._install, release, data)

    def _install_from_url(self, release: Release, offer: ReleaseOffer, current: Policy) -> None:
        t0 = time.monotonic()
        try:
            data = self._download(release, offer.url or "")
        except VerificationError as e:
            self._status(release, f"rejected:{e.reason}", str(e))
            return self._idle()
        self._install(release, data, download_s=time.monotonic() - t0)

    def _download(self, release: Release, url: str) -> bytes:
        free = shutil.disk_usage(self.dir).free
        if free < 2 * release.length + (16 << 20):
            raise VerificationError("no_space", f"{free} bytes free; the bundle needs {release.length}")
        if not url.startswith(("file://", "https://", "http://")):
            raise VerificationError("malformed", "bundle URL must be file://, http:// or https://")
        part = self.dir / "staging" / f"{release.sha256}.part"
        last_error = ""
        for attempt in range(self.s.download_retries):
            try:
                with _open_url(url, self.s.download_timeout) as r, open(part, "wb") as f:
                    self._crash_point("download")
                    got = 0
                    while True:
                        chunk = r.read(min(1 << 16, release.length + 1 - got))
                        if not chunk:
                            break
                        got += len(chunk)
                        if got > release.length:      # endless data: stop at once, keep nothing
                            raise VerificationError("length_mismatch",
                                                    f"the download goes past the stated {release.length} bytes")
                        f.write(chunk)
                data = part.read_bytes()
                part.unlink()
                return data
            except VerificationError:
                part.unlink(missing_ok=True)
                raise
            except OSError as e:          # includes timeouts and HTTP errors
                last_error = str(e)[:200]
                part.unlink(missing_ok=True)
                event(log, "download_retry", level=logging.WARNING, attempt=attempt + 1, error=last_error)
                time.sleep(min(2 ** attempt, 10))
        raise VerificationError("download_failed", last_error)

    # -- install ----------------------------------------------------------------------------

    def _install(self, release: Release, data: bytes, *, download_s: float = 0.0) -> None:
        t0 = time.monotonic()
        try:
            TrustedState.verify_bundle(release, data)
            try:
                bundle = load_bundle(data)
            except BundleError as e:
                raise VerificationError("malformed_bundle", str(e)) from None
            cfg, c = bundle.config, release.compat
            if cfg.obs_dim != c["obs_dim"] or cfg.hidden != c["hidden"] or \
                    {"kind": cfg.action.kind, "size": cfg.action.size} != c["action"]:
                raise VerificationError("incompatible", "the bundle's shape differs from its manifest's")
            policy = Policy(bundle, self.backend)
            golden = golden_check(bundle, policy, self.s.golden_agreement)
            if golden:
                raise VerificationError("golden", golden)
        except VerificationError as e:
            self._status(release, f"rejected:{e.reason}", str(e))
            return self._idle()
        t1 = time.monotonic()
        dest = self.dir / "models" / f"{release.sha256}.safetensors"
        self._crash_point("stage")
        atomic_write(dest, data)
        model = InstalledModel(release.counter, release.sha256, bundle.model_id,
                               hashlib.sha256(release.raw).hexdigest())
        self._crash_point("persist")
        with self._state_lock:
            previous = self.state.current
            self._save_state(self.state.with_trial(model))
        event(log, "install_timing", counter=release.counter, download_ms=round(download_s * 1e3, 1),
              check_ms=round((t1 - t0) * 1e3, 1), write_ms=round((time.monotonic() - t1) * 1e3, 1))
        self._status(release, "installed", bundle.model_id)
        with self._lock:
            superseded, self.trial = self.trial, Trial(release, policy, bundle, previous)
        if superseded is not None:
            self._status(superseded.release, "rolled_back:superseded",
                         f"release {release.counter} replaced it during its trial")
        self._crash_point("swap")
        self._swap(policy)
        self._status(release, "trial", bundle.model_id)
        self._crash_point("trial")
        self._idle()

    # -- trial ------------------------------------------------------------------------------

    def observe(self, policy: Policy, latency_s: float, ok: bool, finite: bool) -> Policy | None:
        """Called after every decision. Returns the policy to swap to when a trial ends in a
        rollback (the caller swaps), else None."""
        t = self.trial
        if t is None or policy is not t.policy:
            return None
        verdict = t.observe(latency_s, ok, finite, self.s.trial_limits, self.baseline_latency_us)
        if verdict is None:
            return None
        return self._end_trial(t, None if verdict == "pass" else verdict)

    def _end_trial(self, t: Trial, failure: str | None) -> Policy | None:
        with self._lock:
            if self.trial is not t:      # superseded meanwhile by a newer release's trial
                return None
            self.trial = None
        if failure is None:
            # The commit's fsyncs run on the update thread, not between two decisions.
            _background(self._commit, t)
            return None
        with self._state_lock:
            replaced = not self._on_trial(t)     # a newer release was installed meanwhile
            if not replaced:
                self._save_state(self.state.rolled_back(t.previous))
        if replaced:
            self._status(t.release, f"rolled_back:{failure}", "a newer release was installed meanwhile")
            return None
        self._status(t.release, f"rolled_back:{failure}", t.bundle.model_id)
        policy, _ = self.boot()
        return policy

    def _on_trial(self, t: Trial) -> bool:
        """Whether the persisted state still has ``t``'s release on trial (a newer install
        replaces it there even after ``t`` ended on the decision thread)."""
        return self.state.trial is not None and self.state.trial.sha256 == t.release.sha256 \
            and self.state.trial.counter == t.release.counter

    def _commit(self, t: Trial) -> None:
        self._crash_point("commit")
        with self._state_lock:
            committed = self._on_trial(t)
            if committed:
                self._save_state(self.state.committed())
        if committed:
            self._status(t.release, "committed", t.bundle.model_id)
        else:
            self._status(t.release, "rolled_back:superseded", "a newer release was installed before its commit")

    def _idle(self) -> None:
        """The install in progress is over: install the newest offer that waited for it, if it
        is still newer than what this device has accepted."""
        while True:
            with self._lock:
                self._busy = False
                if self._queued is None:
                    return
                (release, offer, current), self._queued = self._queued, None
                self._busy = True
            # Verified again as any offer is: a release accepted meanwhile may have raised the
            # counter, and the manifest may have expired while it waited.
            try:
                self._verify(offer.manifest)
            except VerificationError as e:
                self._status(release, f"rejected:{e.reason}", f"{e} (checked again after the update in progress)")
                continue
            return _background(self._install_from_url, release, offer, current)

    # -- persistence and reporting ----------------------------------------------------------

    def _save_state(self, state: AgentState) -> None:
        state.save(self.dir / "state.json")
        self.state = state

    def _status(self, release: Release | None, status: str, detail: str = "", *, manifest: str = "") -> None:
        report = StatusReport.parse(status, counter=release.counter if release else None, detail=detail[:300],
                                    manifest=manifest)
        self.statuses.append(report)
        event(log, "update_status", level=logging.WARNING if report.failed else logging.INFO,
              status=report.status, counter=report.counter, detail=report.detail)
        try:
            self._report(report)
        except Exception:  # noqa: BLE001 - reporting must never break an update
            log.exception("status report failed")

    @staticmethod
    def _crash_point(step: str) -> None:
        # Tests kill the device at each install step (COGBERT_UPDATE_CRASH_AT=<step>) and check
        # that it boots a verified model afterwards.
        if os.environ.get("COGBERT_UPDATE_CRASH_AT") == step:
            os._exit(137)
