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
]


class CogbertError(Exception):
    """Root of every error Cogbert raises on purpose."""


class ConfigError(CogbertError, ValueError):
    """A configuration value (argument, environment variable, file) is invalid."""


class BundleError(CogbertError, ValueError):
    """A model bundle is malformed, truncated, inconsistent or of an unsupported version.

    Raised for anything read from a bundle file or buffer: the bytes are untrusted until
    they have passed every check in :mod:`cogbert_edge.bundle`.
    """


class ObservationError(CogbertError, ValueError):
    """An observation handed to a policy has the wrong shape or dtype, or is not finite."""


class BackendUnavailableError(CogbertError, RuntimeError):
    """The requested inference backend cannot run here (not installed or not built)."""
