"""The rollout's stages and the thresholds its analysis aborts on."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RolloutSettings"]


@dataclass
class RolloutSettings:
    fleet: str = "default"
    stages: tuple[int, ...] = (5, 25, 100)     # % of the non-control devices offered the candidate
    control_pct: int = 10                      # top buckets that stay on the stable release
    stage_seconds: float = 60.0                # observation time before a stage is analysed
    stage_timeout: float = 300.0               # a stage still short of data then aborts
    report_timeout: float = 60.0               # an offered device silent this long counts as a failure
    min_devices: int = 2
    min_decisions: int = 200
    max_install_failure_rate: float = 0.2
    max_error_rate: float = 0.01
    max_nan_rate: float = 0.001
    latency_factor: float = 2.0                # canary p95 may be this times the control's ...
    latency_slack_us: float = 200.0            # ... plus this much
    reward_alpha: float = 0.05                 # level of the one-sided reward test
    notify_rate: float = 20.0                  # release offers per second
