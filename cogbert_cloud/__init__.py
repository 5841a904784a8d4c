"""Cogbert cloud: the fleet service (PKI, ingestion, training, gate, signing, rollout).

    from cogbert_cloud import open_store, ExperienceDataset        # data: docs/experience-pipeline.md
    from cogbert_cloud import PPOTrainer, VTraceTrainer            # learning: docs/training.md
    from cogbert_cloud import evaluate_candidate, GateSettings     # the gate: docs/ope.md
    from cogbert_cloud import KeyStore, create_release, Registry   # release: docs/security.md
    from cogbert_cloud import RolloutController, RolloutSettings   # staged rollout: docs/operations.md

The public API is what ``__all__`` lists; every other module member is private. Names are
imported on first use: the learning stack (MLX, Gymnasium) loads only when a trainer is used.
Subpackages, one per stage: ``fleet/`` (PKI, broker), ``data/`` (ingest, store, keys, dataset),
``learn/`` (environments, trainers, OPE, gate), ``release/`` (signing, registry, distribution,
rollout), ``service/`` (the long-running composition, operator API, loop, demo).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogbert_cloud.errors import (
    BrokerError,
    ConflictError,
    IngestError,
    NotFoundError,
    OPEError,
    PKIError,
    RegistryError,
    RolloutConflict,
    StoreError,
    TrainingError,
)
from cogbert_edge._internal.lazy import lazy_exports

_LAZY = {
    "PKI": ".fleet.pki",
    "BrokerConfig": ".fleet.broker",
    "LocalBroker": ".fleet.broker",
    "ObjectStore": ".data.store",
    "FileStore": ".data.store",
    "S3Store": ".data.store",
    "open_store": ".data.store",
    "IngestService": ".data.ingest",
    "IngestSettings": ".data.ingest",
    "ExperienceDataset": ".data.dataset",
    "make_env": ".learn.envs",
    "make_vec_env": ".learn.envs",
    "PPOConfig": ".learn.train.ppo",
    "PPOTrainer": ".learn.train.ppo",
    "VTraceConfig": ".learn.train.vtrace",
    "VTraceTrainer": ".learn.train.vtrace",
    "export_bundle": ".learn.train.export",
    "GateSettings": ".learn.gate",
    "evaluate_candidate": ".learn.gate",
    "KeyStore": ".release.signing",
    "create_release": ".release.signing",
    "Registry": ".release.registry",
    "publish_release": ".release.distribution",
    "FleetView": ".release.rollout",
    "RolloutController": ".release.rollout",
    "RolloutSettings": ".release.rollout",
}

__all__ = [
    "BrokerConfig",
    "BrokerError",
    "ConflictError",
    "ExperienceDataset",
    "FileStore",
    "FleetView",
    "GateSettings",
    "IngestError",
    "IngestService",
    "IngestSettings",
    "KeyStore",
    "LocalBroker",
    "NotFoundError",
    "OPEError",
    "ObjectStore",
    "PKI",
    "PKIError",
    "PPOConfig",
    "PPOTrainer",
    "Registry",
    "RegistryError",
    "RolloutConflict",
    "RolloutController",
    "RolloutSettings",
    "S3Store",
    "StoreError",
    "TrainingError",
    "VTraceConfig",
    "VTraceTrainer",
    "create_release",
    "evaluate_candidate",
    "export_bundle",
    "make_env",
    "make_vec_env",
    "open_store",
    "publish_release",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)


if TYPE_CHECKING:
    from cogbert_cloud.data.dataset import ExperienceDataset
    from cogbert_cloud.data.ingest import IngestService, IngestSettings
    from cogbert_cloud.data.store import FileStore, ObjectStore, S3Store, open_store
    from cogbert_cloud.fleet.broker import BrokerConfig, LocalBroker
    from cogbert_cloud.fleet.pki import PKI
    from cogbert_cloud.learn.envs import make_env, make_vec_env
    from cogbert_cloud.learn.gate import GateSettings, evaluate_candidate
    from cogbert_cloud.learn.train.export import export_bundle
    from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer
    from cogbert_cloud.learn.train.vtrace import VTraceConfig, VTraceTrainer
    from cogbert_cloud.release.distribution import publish_release
    from cogbert_cloud.release.registry import Registry
    from cogbert_cloud.release.rollout import FleetView, RolloutController, RolloutSettings
    from cogbert_cloud.release.signing import KeyStore, create_release
