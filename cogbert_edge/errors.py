"""The one exception hierarchy of Cogbert, shared by the edge SDK and the cloud service.

Every error Cogbert raises on purpose derives from :class:`CogbertError`; messages say what
happened and, where there is something to do about it, what to do. The device SDK's part::

    CogbertError
    ├── ConfigError (ValueError)            an argument, environment variable or file is invalid
    ├── BundleError (ValueError)            a model bundle is malformed or unsupported
    ├── ObservationError (ValueError)       an observation of the wrong shape, dtype, or not finite
    ├── BackendUnavailableError             an inference backend cannot run here
    ├── WireError (ValueError)              a message from the other side is malformed or hostile
    │   ├── RecordError                     an experience record does not decode
    │   └── BatchError                      an experience batch is malformed or hostile
    ├── VerificationError                   signed metadata or a bundle failed verification
    ├── LinkError (RuntimeError)            the MQTT link to the cloud
    │   ├── LinkTimeout (TimeoutError)
    │   ├── LinkClosedError
    │   ├── PublishDeniedError
    │   └── SubscribeDeniedError
    ├── DecideRequestError                  the cloud decision service refused a request
    └── DecideUnavailable (ConnectionError) the cloud decision service could not be reached

The cloud's errors (:mod:`cogbert_cloud.errors`) hang from the same root. The ``ValueError``
and ``RuntimeError`` bases are kept for callers that caught those before the tree existed.
"""

from __future__ import annotations

__all__ = [
    "CogbertError",
    "ConfigError",
    "BundleError",
    "ObservationError",
    "BackendUnavailableError",
    "WireError",
    "RecordError",
    "BatchError",
    "VerificationError",
    "LinkError",
    "LinkTimeout",
    "LinkClosedError",
    "PublishDeniedError",
    "SubscribeDeniedError",
    "DecideRequestError",
    "DecideUnavailable",
]


class CogbertError(Exception):
    """Root of every error Cogbert raises on purpose."""


class ConfigError(CogbertError, ValueError):
    """A configuration value (argument, environment variable, file) is invalid."""


class BundleError(CogbertError, ValueError):
    """A model bundle is malformed, truncated, inconsistent or of an unsupported version.

    Raised for anything read from a bundle file or buffer: the bytes are untrusted until
    they have passed every check in :mod:`cogbert_edge.inference.bundle`.
    """


class ObservationError(CogbertError, ValueError):
    """An observation handed to a policy has the wrong shape or dtype, or is not finite."""


class BackendUnavailableError(CogbertError, RuntimeError):
    """The requested inference backend cannot run here (not installed or not built)."""


class WireError(CogbertError, ValueError):
    """A message read from the network (an ack, telemetry, a status report, a release offer, an
    experience batch) is malformed, hostile, or of a version this code does not read."""


class RecordError(WireError):
    """An experience record does not decode (only possible after storage corruption)."""


class BatchError(WireError):
    """An experience batch is malformed or hostile; the message says which check failed."""


class VerificationError(CogbertError):
    """Signed metadata or a bundle failed verification. ``reason`` is a short machine-readable
    word (``unknown_key``, ``bad_signature``, ``expired``, ``rollback``, ``mismatch``,
    ``incompatible``, ``hash_mismatch``, ``length_mismatch``, ``malformed``, ``version``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class LinkError(CogbertError, RuntimeError):
    """Something went wrong on the MQTT link to the cloud."""


class LinkTimeout(LinkError, TimeoutError):
    """An operation on the link did not complete in time (the link may be down)."""


class LinkClosedError(LinkError):
    """The link was closed; the operation can no longer complete."""


class PublishDeniedError(LinkError):
    """The broker refused a publish (PUBACK reason code >= 0x80), e.g. not authorized."""

    def __init__(self, topic: str, reason: str, code: int) -> None:
        super().__init__(f"broker refused publish to {topic!r}: {reason} (0x{code:02x})")
        self.topic, self.reason, self.code = topic, reason, code


class SubscribeDeniedError(LinkError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""

    def __init__(self, topic_filter: str, reason: str, code: int) -> None:
        super().__init__(f"broker refused subscription to {topic_filter!r}: {reason} (0x{code:02x})")
        self.topic_filter, self.reason, self.code = topic_filter, reason, code


class DecideRequestError(CogbertError):
    """The decision service refused a request; ``status`` is the HTTP status, ``code`` its word
    (``docs/decision-service.md`` lists them), ``retry_after`` the seconds it asked to wait."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.retry_after = status, code, retry_after


class DecideUnavailable(CogbertError, ConnectionError):
    """The decision service could not be reached (after the retries)."""
