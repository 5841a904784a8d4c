"""The decision service: recurrent policies served to thin clients over HTTP and WebSocket.

Sessions with state that moves in authenticated tokens, micro-batching into the backend's batch
step, signed releases verified as devices verify them, session cohorts in staged rollouts, and
every decision logged into the fleet's experience pipeline. ``docs/decision-service.md``.
"""

from __future__ import annotations

from cogbert_cloud.service.decide.config import DecideSettings
from cogbert_cloud.service.decide.errors import DecideError

__all__ = ["DecideSettings", "DecideError"]
