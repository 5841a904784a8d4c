"""Cogbert cloud: the fleet service (PKI, ingestion, training, signing, rollout).

The public API is what ``__all__`` lists; every other module member is private.
"""

__all__: list[str] = []
