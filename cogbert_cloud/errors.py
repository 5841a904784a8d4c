"""Errors of the cloud service, in the one hierarchy rooted at ``CogbertError``
(:mod:`cogbert_edge.errors` draws the device SDK's part)::

    CogbertError
    ├── PKIError                  the fleet PKI is missing, inconsistent, or refuses an operation
    ├── BrokerError               Mosquitto could not be configured, started or signalled
    ├── StoreError                the object store could not read, write or list
    │   └── RegistryError         a registry operation was refused
    │       ├── ReleaseNotFound   (also a NotFoundError)
    │       └── ReleaseConflict   (also a ConflictError)
    ├── IngestError               ingestion cannot start or continue
    ├── NotFoundError             what was asked for does not exist        -> HTTP 404
    ├── ConflictError             not possible in the current state         -> HTTP 409
    │   └── RolloutConflict       a rollout cannot start or change state now
    ├── TrainingError             a training run failed or did not finish in time
    │   └── ExportRefused         the quantized model is too far from the fp32 one
    └── OPEError                  off-policy evaluation cannot run on this data

The operator API maps exception *types* to status codes (``service/api.py``), never message
text: an error that should be a 404 or 409 must be (a subclass of) one of those two.
"""

from __future__ import annotations

from cogbert_edge.errors import CogbertError, ConfigError

__all__ = ["PKIError", "BrokerError", "StoreError", "IngestError", "NotFoundError", "ConflictError", "TrainingError",
           "EnvironmentNotFoundError", "UnsupportedSpaceError"]


class PKIError(CogbertError):
    """The fleet PKI directory is missing, inconsistent, or an operation on it is refused."""


class BrokerError(CogbertError):
    """The Mosquitto broker could not be configured, started or signalled."""


class StoreError(CogbertError):
    """The object store could not read, write or list an object."""


class IngestError(CogbertError):
    """The ingestion service cannot start or continue."""


class NotFoundError(CogbertError):
    """The object asked for does not exist (an API answers 404)."""


class ConflictError(CogbertError):
    """The operation is not possible in the current state (an API answers 409)."""


class TrainingError(CogbertError):
    """A training run failed, or did not finish in time."""


class EnvironmentNotFoundError(ConfigError):
    """A training environment id is not registered with Gymnasium (nor importable as ``module:Class``)."""


class UnsupportedSpaceError(ConfigError):
    """An environment's observation or action space is one the trainer cannot learn on (images, Dict, Text...)."""


class RegistryError(StoreError):
    """A registry operation was refused (unknown release, illegal state change)."""


class ReleaseNotFound(RegistryError, NotFoundError):
    """No release with that counter is registered."""


class ReleaseConflict(RegistryError, ConflictError):
    """The release cannot be registered or change state that way."""


class RolloutConflict(ConflictError):
    """A rollout cannot start or change state now (another is running, the release is not a
    candidate, there is no rollout to pause)."""


class ExportRefused(TrainingError):
    """The quantized model is too far from the fp32 one; the message has the numbers."""


class OPEError(CogbertError):
    """Off-policy evaluation cannot run on this data (wrong shapes, no episodes, bad values)."""


class OperatorApiError(CogbertError):
    """The operator API refused a request (``status``: its HTTP code) or could not be reached
    (``status`` None): what ``cogbert fleet`` reports in one line."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
