"""Staged rollout: canary cohorts, analysis against a control cohort, promotion or rollback.

- :mod:`.fleet`       what the devices report (telemetry, status) and their cohort buckets
- :mod:`.settings`    stages and abort thresholds
- :mod:`.analysis`    one stage's verdict, a pure function of the reports
- :mod:`.stats`       the one-sided Welch test the reward check uses
- :mod:`.controller`  the state machine that offers, analyses, promotes and rolls back
- :mod:`.sites`       site-consistent rollouts of multi-agent releases (whole sites per stage)
"""

from cogbert_cloud.errors import RolloutConflict
from cogbert_cloud.release.rollout.analysis import StageResult, StageWindow, analyze
from cogbert_cloud.release.rollout.controller import Rollout, RolloutController, StageRecord
from cogbert_cloud.release.rollout.fleet import DeviceRecord, FleetView, ReceivedStatus, bucket
from cogbert_cloud.release.rollout.settings import RolloutSettings
from cogbert_cloud.release.rollout.sites import SiteRelease, SiteRollout, canary_sites
from cogbert_cloud.release.rollout.stats import welch_p_less

__all__ = ["RolloutSettings", "FleetView", "DeviceRecord", "ReceivedStatus", "RolloutController", "Rollout",
           "StageRecord", "RolloutConflict", "StageResult", "StageWindow", "analyze", "bucket", "welch_p_less",
           "SiteRelease", "SiteRollout", "canary_sites"]
