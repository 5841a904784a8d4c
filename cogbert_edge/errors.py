"""The one exception hierarchy of Cogbert, shared by the edge SDK and the cloud service.

Every error a caller can act on derives from :class:`CogbertError`. Messages say what
happened and, where there is something to do about it, what to do.
"""

from __future__ import annotations

__all__ = [
    "CogbertError",
    "ConfigError",
    "BundleError",
    "ObservationError",
    "BackendUnavailableError",
    "LinkError",
    "LinkTimeout",
    "LinkClosedError",
    "PublishDeniedError",
    "SubscribeDeniedError",
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
