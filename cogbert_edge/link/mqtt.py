"""The MQTT link between a device (or a cloud service) and the broker: MQTT 5 over mutual TLS.

    link = MqttLink(LinkSettings.for_device("mqtts://broker:8883", pki_dir, "dev-1"))
    link.start()
    link.subscribe(device_topic("f", "dev-1", "ack"), on_ack)
    link.publish(topic, payload).wait(timeout=5)     # raises PublishDeniedError if refused

What it guarantees, and why:

- TLS 1.2 or later, the broker's certificate checked against the fleet CA *and* the host name.
- A persistent session: ``clean_start`` is always false and a session expiry is set, so QoS 1
  messages queued for an offline device survive its reconnects (paho's default would wipe the
  broker session at every process start).
- Subscriptions are sent again after every (re)connect, because a broker that crashed before
  its autosave has forgotten them.
- Reconnects back off exponentially with full jitter, so a fleet does not reconnect in step
  after a broker restart.
- ``publish`` is thread-safe and returns a :class:`PublishHandle`; the PUBACK's reason code is
  checked: a publish the broker denies (not authorized, too large) fails the handle with
  :class:`PublishDeniedError` instead of counting as delivered. Unacknowledged QoS 1 messages
  are resent after a reconnect (in this process; a process restart loses paho's in-memory
  queue, which is why experience lives in the on-disk outbox until the cloud acknowledges it).
- Exceptions raised by callbacks are logged with their traceback and counted, never swallowed
  silently and never allowed to kill the network thread.
- ``state`` is observable (and listeners are told of changes); ``close`` disconnects cleanly.
"""

from __future__ import annotations

import enum
import logging
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cogbert_edge._internal.log import event
from cogbert_edge.errors import (
    ConfigError,
    LinkClosedError,
    LinkError,
    LinkTimeout,
    PublishDeniedError,
    SubscribeDeniedError,
)
from cogbert_edge.wire.topics import check_device_id

__all__ = ["LinkSettings", "LinkState", "MqttLink", "Message", "PublishHandle", "SubscribeHandle"]

log = logging.getLogger("cogbert.link")


class LinkState(str, enum.Enum):
    IDLE = "idle"                  # not started
    CONNECTING = "connecting"      # TCP + TLS + CONNECT in progress
    CONNECTED = "connected"        # CONNACK received, subscriptions sent
    BACKOFF = "backoff"            # connection lost or refused; waiting to retry
    CLOSED = "closed"              # close() was called


@dataclass
class LinkSettings:
    """How to reach the broker and who we are. Paths are PEM files."""

    broker: str = "mqtts://localhost:8883"
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str = ""
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600   # seconds the broker keeps our session while offline
    backoff_min: float = 0.25
    backoff_max: float = 30.0
    connect_timeout: float = 10.0
    max_inflight: int = 64                # QoS 1 messages awaiting PUBACK at once
    manual_ack: bool = False              # acknowledge received messages explicitly (Message.ack)

    def __post_init__(self) -> None:
        url = urlparse(self.broker)
        if url.scheme != "mqtts" or not url.hostname:
            raise ConfigError(f"broker URL {self.broker!r} must be mqtts://HOST[:PORT]; Cogbert speaks "
                              "MQTT only over TLS")
        if self.backoff_min <= 0 or self.backoff_max < self.backoff_min:
            raise ConfigError("need 0 < backoff_min <= backoff_max")

    @property
    def host(self) -> str:
        return urlparse(self.broker).hostname or ""

    @property
    def port(self) -> int:
        return urlparse(self.broker).port or 8883

    @classmethod
    def for_device(cls, broker: str, pki_dir: Path, device_id: str, **kw) -> LinkSettings:
        """Settings for device ``device_id`` from a PKI directory's standard layout."""
        d = Path(pki_dir)
        check_device_id(device_id)
        kw.setdefault("client_id", device_id)
        return cls(broker=broker, ca_file=d / "ca.pem", cert_file=d / "devices" / device_id / "cert.pem",
                   key_file=d / "devices" / device_id / "key.pem", **kw)

    @classmethod
    def for_service(cls, broker: str, pki_dir: Path, name: str, client_id: str = "", **kw) -> LinkSettings:
        d = Path(pki_dir)
        return cls(broker=broker, ca_file=d / "ca.pem", cert_file=d / "services" / name / "cert.pem",
                   key_file=d / "services" / name / "key.pem", client_id=client_id or name, **kw)

    def tls_context(self) -> ssl.SSLContext:
        if not (self.ca_file and self.cert_file and self.key_file):
            raise ConfigError("mutual TLS needs ca_file, cert_file and key_file")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load TLS files ({self.ca_file}, {self.cert_file}): {e}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class _Handle:
    """Completion of one operation: wait for it, or be called back when it is done."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: LinkError | None = None
        self._callbacks: list[Callable[[_Handle], None]] = []
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> LinkError | None:
        return self._error

    def wait(self, timeout: float) -> None:
        """Block until done; raise its error, or :class:`LinkTimeout` after ``timeout`` s."""
        if not self._done.wait(timeout):
            raise LinkTimeout(f"{self!r} not acknowledged within {timeout:g}s")
        if self._error is not None:
            raise self._error

    def add_done_callback(self, fn: Callable[[_Handle], None]) -> None:
        """Call ``fn(handle)`` once done (at once if already done), from the network thread."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        _call_safely(fn, self, what="done callback")

    def _finish(self, error: LinkError | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            _call_safely(fn, self, what="done callback")


class PublishHandle(_Handle):
    def __init__(self, topic: str, mid: int) -> None:
        super().__init__()
        self.topic, self.mid = topic, mid

    def __repr__(self) -> str:
        return f"PublishHandle(topic={self.topic!r}, mid={self.mid})"


class SubscribeHandle(_Handle):
    def __init__(self, topic_filter: str) -> None:
        super().__init__()
        self.topic_filter = topic_filter

    def __repr__(self) -> str:
        return f"SubscribeHandle({self.topic_filter!r})"


@dataclass
class Message:
    """A received message. With ``manual_ack``, call :meth:`ack` once it is safely handled;
    an unacknowledged QoS 1 message is delivered again after a reconnect."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties | None
    _ack: Callable[[], None] | None = None

    def ack(self) -> None:
        if self._ack is not None:
            self._ack()
            self._ack = None


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    callback: Callable[[Message], None]
    handle: SubscribeHandle


def _call_safely(fn: Callable, *args: object, what: str) -> bool:
    """Run a user callback; log its exception with the traceback instead of losing it."""
    try:
        fn(*args)
        return True
    except Exception:  # noqa: BLE001 - a user callback must never kill the network thread
        log.exception("callback raised", extra={"fields": {"event": "callback_error", "callback": what}})
        return False


class MqttLink:
    """One MQTT 5 connection with its own network thread. See the module docstring."""

    def __init__(self, settings: LinkSettings, *, name: str = "") -> None:
        self.settings = settings
        self.name = name or settings.client_id
        self._state = LinkState.IDLE
        self._state_cv = threading.Condition()
        self._listeners: list[Callable[[LinkState], None]] = []
        self._subs: dict[str, _Subscription] = {}
        self._sub_mids: dict[int, list[_Subscription]] = {}
        self._pending: dict[int, PublishHandle] = {}
        self._early: dict[int, tuple[int, str]] = {}   # PUBACKs that beat their registration
        self._early_subacks: dict[int, list] = {}      # SUBACKs likewise
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self.callback_errors = 0
        self.connects = 0

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=settings.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=settings.manual_ack)
        c.tls_set_context(settings.tls_context())
        c.connect_timeout = settings.connect_timeout
        c.max_inflight_messages_set(settings.max_inflight)
        c.suppress_exceptions = True
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._state

    def add_state_listener(self, fn: Callable[[LinkState], None]) -> None:
        self._listeners.append(fn)

    def start(self) -> MqttLink:
        if self._thread is not None:
            raise LinkError("link already started")
        self._thread = threading.Thread(target=self._run, name=f"cogbert-link-{self.name}", daemon=True)
        self._thread.start()
        return self

    def wait_connected(self, timeout: float) -> None:
        with self._state_cv:
            if not self._state_cv.wait_for(lambda: self._state in (LinkState.CONNECTED, LinkState.CLOSED),
                                           timeout):
                raise LinkTimeout(f"link {self.name} not connected within {timeout:g}s (state {self._state.value})")
        if self._state is LinkState.CLOSED:
            raise LinkClosedError(f"link {self.name} is closed")

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and stop the network thread. Pending handles fail with
        :class:`LinkClosedError`."""
        self._closing.set()
        try:
            self._client.disconnect()
        except Exception:  # noqa: BLE001 - closing a half-open client may raise; we are done with it
            pass
        if self._thread is not None:
            self._thread.join(timeout)
        self._set_state(LinkState.CLOSED)
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            subs = [s for s in self._subs.values() if not s.handle.done()]
        for h in pending:
            h._finish(LinkClosedError(f"link {self.name} closed before {h.topic!r} was acknowledged"))
        for s in subs:
            s.handle._finish(LinkClosedError(f"link {self.name} closed"))

    def __enter__(self) -> MqttLink:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operations -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> PublishHandle:
        """Queue a message; thread-safe. QoS 1 completes on a successful PUBACK, QoS 0 once
        written. Works while disconnected: the message is sent after the next connect."""
        if self._closing.is_set():
            raise LinkClosedError(f"link {self.name} is closed")
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        handle = PublishHandle(topic, info.mid)
        # A QoS 1 message stays queued in paho whatever the socket did (it is sent again after
        # the next connect) unless the queue was full; a QoS 0 message is gone if not written.
        lost = info.rc == mqtt.MQTT_ERR_QUEUE_SIZE if qos else info.rc != mqtt.MQTT_ERR_SUCCESS
        if lost:
            handle._finish(LinkError(f"publish to {topic!r} failed locally: {mqtt.error_string(info.rc)}"))
            return handle
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = handle
        if early is not None:
            self._complete(handle, *early)
        return handle

    def subscribe(self, topic_filter: str, callback: Callable[[Message], None], *, qos: int = 1) -> SubscribeHandle:
        """Subscribe now (if connected) and again after every reconnect. The handle fails with
        :class:`SubscribeDeniedError` if the broker refuses the filter."""
        sub = _Subscription(topic_filter, qos, callback, SubscribeHandle(topic_filter))
        with self._lock:
            self._subs[topic_filter] = sub
        # paho matches messages against filters literally; a shared subscription's messages
        # arrive on the topic without the "$share/GROUP/" prefix.
        match = topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
        self._client.message_callback_add(match, self._dispatcher(sub))
        if self._state is LinkState.CONNECTED:
            self._send_subscribe([sub])
        return sub.handle

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _run(self) -> None:
        # paho writes to the socket from whichever thread publishes unless it knows its network
        # thread; concurrent writes to a TLS socket corrupt the stream (the broker then drops
        # us). Telling paho that this is its thread makes other threads only queue packets and
        # wake this loop, as with loop_start(), while we keep our own reconnect policy.
        self._client._thread = threading.current_thread()
        attempt = 0
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        # clean_start=False on *every* connect, the first included: the session (and the QoS 1
        # messages the broker holds for us) must survive process restarts too.
        self._client.connect_async(self.settings.host, self.settings.port, self.settings.keepalive,
                                   clean_start=False, properties=props)
        while not self._closing.is_set():
            self._set_state(LinkState.CONNECTING)
            try:
                self._client.reconnect()
            except (OSError, ssl.SSLError, ValueError) as e:
                attempt += 1
                event(log, "connect_failed", level=logging.WARNING, link=self.name,
                      broker=self.settings.broker, attempt=attempt, error=str(e)[:200])
                self._backoff(attempt)
                continue
            while not self._closing.is_set():
                # publish() and disconnect() wake paho's select through its socket pair, so a
                # long timeout costs nothing but idle wake-ups (200 links: 2,000 a second at 0.1).
                rc = self._client.loop(timeout=1.0)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self._closing.is_set():
                break
            attempt = 0 if self._state is LinkState.CONNECTED else attempt + 1
            self._backoff(max(attempt, 1))

    def _backoff(self, attempt: int) -> None:
        self._set_state(LinkState.BACKOFF)
        # Full jitter: uniform in [0, min(max, min * 2^attempt)].
        cap = min(self.settings.backoff_max, self.settings.backoff_min * 2 ** min(attempt, 20))
        self._closing.wait(random.uniform(self.settings.backoff_min / 2, cap))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            event(log, "connect_refused", level=logging.WARNING, link=self.name, reason=str(reason_code))
            client.disconnect()
            return
        self.connects += 1
        event(log, "connected", link=self.name, broker=self.settings.broker,
              session_present=bool(flags.session_present), connects=self.connects)
        with self._lock:
            subs = list(self._subs.values())
        if subs:
            self._send_subscribe(subs)
        self._set_state(LinkState.CONNECTED)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._closing.is_set():
            event(log, "disconnected", level=logging.WARNING, link=self.name, reason=str(reason_code))
            self._set_state(LinkState.BACKOFF)

    def _send_subscribe(self, subs: list[_Subscription]) -> None:
        rc, mid = self._client.subscribe([(s.topic_filter, s.qos) for s in subs])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:   # paho gives a message id exactly on success
            return   # not connected: on_connect subscribes again
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._sub_mids[mid] = subs
        if early is not None:
            self._finish_subscribe(subs, early)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            subs = self._sub_mids.pop(mid, None)
            if subs is None:   # the SUBACK beat the registration in _send_subscribe
                self._early_subacks[mid] = list(reason_codes)
                return
        self._finish_subscribe(subs, reason_codes)

    def _finish_subscribe(self, subs: list[_Subscription], reason_codes: list) -> None:
        # A SUBACK has one reason code per filter. Should a broker send fewer, the filters left over
        # are not answered (their handles wait) rather than an exception raised in paho's network thread.
        for sub, rc in zip(subs, reason_codes, strict=False):
            if rc.is_failure:
                event(log, "subscribe_denied", level=logging.WARNING, link=self.name,
                      topic_filter=sub.topic_filter, reason=str(rc))
                sub.handle._finish(SubscribeDeniedError(sub.topic_filter, str(rc), rc.value))
            else:
                sub.handle._finish()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        code, reason = reason_code.value, str(reason_code)
        with self._lock:
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early[mid] = (code, reason)
                return
        self._complete(handle, code, reason)

    def _complete(self, handle: PublishHandle, code: int, reason: str) -> None:
        if code >= 0x80:
            event(log, "publish_denied", level=logging.WARNING, link=self.name, topic=handle.topic, reason=reason)
            handle._finish(PublishDeniedError(handle.topic, reason, code))
        else:
            handle._finish()

    def _on_message(self, client, userdata, msg) -> None:
        # Messages on no registered filter (e.g. a stale broker session): acknowledge and drop.
        if self.settings.manual_ack:
            client.ack(msg.mid, msg.qos)

    def _dispatcher(self, sub: _Subscription) -> Callable:
        def dispatch(client, userdata, msg) -> None:
            ack = (lambda: client.ack(msg.mid, msg.qos)) if self.settings.manual_ack else None
            m = Message(msg.topic, msg.payload, msg.qos, msg.retain, getattr(msg, "properties", None), ack)
            if not _call_safely(sub.callback, m, what=f"message on {sub.topic_filter}"):
                self.callback_errors += 1
        return dispatch

    def _set_state(self, state: LinkState) -> None:
        with self._state_cv:
            if self._state is state or self._state is LinkState.CLOSED:
                return
            self._state = state
            self._state_cv.notify_all()
        for fn in list(self._listeners):
            _call_safely(fn, state, what="state listener")
