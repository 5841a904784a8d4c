"""Cogbert edge SDK: run signed, quantized recurrent policies on a device.

The public API is what ``__all__`` lists; every other module member is private.
"""

from .bundle import Bundle, load_bundle
from .errors import (BackendUnavailableError, BundleError, CogbertError, ConfigError,
                     ObservationError)
from .model import ActionSpace, ModelConfig, init_params
from .policy import Decision, Policy, State
from .quant import QuantSpec

__version__ = "0.1.0"

__all__ = [
    "ActionSpace",
    "BackendUnavailableError",
    "Bundle",
    "BundleError",
    "CogbertError",
    "ConfigError",
    "Decision",
    "ModelConfig",
    "ObservationError",
    "Policy",
    "QuantSpec",
    "State",
    "init_params",
    "load_bundle",
    "__version__",
]
