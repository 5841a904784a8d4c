"""Cogbert edge SDK: run signed, quantized recurrent policies on a device.

    from cogbert_edge import Policy                       # decide: docs/architecture.md
    from cogbert_edge import Device, DeviceSettings       # a connected device: docs/device-sdk.md

The public API is what ``__all__`` lists; every other module member is private. Names are
imported on first use, so that ``import cogbert_edge`` (and its configuration and error
modules) costs nothing until a policy is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (BackendUnavailableError, BundleError, CogbertError, ConfigError, LinkError,
                     ObservationError)

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "ActionSpace": ".model",
    "ModelConfig": ".model",
    "init_params": ".model",
    "Bundle": ".bundle",
    "load_bundle": ".bundle",
    "QuantSpec": ".quant",
    "Decision": ".policy",
    "Policy": ".policy",
    "State": ".policy",
    "Device": ".device",
    "DeviceSettings": ".device",
    "LoggedDecision": ".device",
    "OutboxSettings": ".outbox",
    "UploaderSettings": ".uploader",
    "LinkSettings": ".link",
    "UpdateSettings": ".updater",
}

__all__ = [
    "ActionSpace",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "CogbertError",
    "ConfigError",
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
    "State",
    "UpdateSettings",
    "UploaderSettings",
    "init_params",
    "load_bundle",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cogbert_edge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .bundle import Bundle, load_bundle
    from .device import Device, DeviceSettings, LoggedDecision
    from .link import LinkSettings
    from .model import ActionSpace, ModelConfig, init_params
    from .outbox import OutboxSettings
    from .policy import Decision, Policy, State
    from .quant import QuantSpec
    from .updater import UpdateSettings
    from .uploader import UploaderSettings
