"""Errors of the cloud service, in the one hierarchy rooted at ``CogbertError``."""

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
