"""Cogbert edge SDK: run signed, quantized recurrent policies on a device.

    from cogbert_edge import Policy                       # decide: docs/architecture.md
    from cogbert_edge import Device, DeviceSettings       # a connected device: docs/device-sdk.md

The public API is what ``__all__`` lists; every other module member is private. Names are
imported on first use, so that ``import cogbert_edge`` (and its configuration and error
modules) costs nothing until a policy is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogbert_edge._internal.lazy import lazy_exports
from cogbert_edge.errors import (
    BackendUnavailableError,
    BundleError,
    CogbertError,
    ConfigError,
    DecideRequestError,
    DecideUnavailable,
    LinkError,
    ObservationError,
    VerificationError,
    WireError,
)

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "ActionSpace": ".inference.model",
    "ModelConfig": ".inference.model",
    "init_params": ".inference.model",
    "Bundle": ".inference.bundle",
    "load_bundle": ".inference.bundle",
    "QuantSpec": ".inference.quant",
    "Decision": ".inference.policy",
    "Policy": ".inference.policy",
    "State": ".inference.policy",
    "AsyncDecideClient": ".decide_client",
    "DecideClient": ".decide_client",
    "RemoteDecision": ".decide_client",
    "Device": ".device",
    "DeviceSettings": ".device",
    "LoggedDecision": ".device",
    "OutboxSettings": ".experience.outbox",
    "UploaderSettings": ".experience.uploader",
    "LinkSettings": ".link.mqtt",
    "UpdateSettings": ".update.agent",
    "Ack": ".wire.messages",
    "Chunk": ".wire.messages",
    "ReleaseOffer": ".wire.messages",
    "StatusReport": ".wire.messages",
    "Telemetry": ".wire.messages",
}

__all__ = [
    "Ack",
    "ActionSpace",
    "AsyncDecideClient",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "Chunk",
    "CogbertError",
    "ConfigError",
    "DecideClient",
    "DecideRequestError",
    "DecideUnavailable",
    "Decision",
    "Device",
    "DeviceSettings",
    "LinkError",
    "LinkSettings",
    "LoggedDecision",
    "ModelConfig",
    "ObservationError",
    "OutboxSettings",
    "Policy",
    "QuantSpec",
    "ReleaseOffer",
    "RemoteDecision",
    "State",
    "StatusReport",
    "Telemetry",
    "UpdateSettings",
    "UploaderSettings",
    "VerificationError",
    "WireError",
    "init_params",
    "load_bundle",
    "__version__",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


if TYPE_CHECKING:
    from cogbert_edge.decide_client import (
        AsyncDecideClient,
        DecideClient,
        RemoteDecision,
    )
    from cogbert_edge.device import Device, DeviceSettings, LoggedDecision
    from cogbert_edge.experience.outbox import OutboxSettings
    from cogbert_edge.experience.uploader import UploaderSettings
    from cogbert_edge.inference.bundle import Bundle, load_bundle
    from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params
    from cogbert_edge.inference.policy import Decision, Policy, State
    from cogbert_edge.inference.quant import QuantSpec
    from cogbert_edge.link.mqtt import LinkSettings
    from cogbert_edge.update.agent import UpdateSettings
    from cogbert_edge.wire.messages import Ack, Chunk, ReleaseOffer, StatusReport, Telemetry
