"""Getting signed releases to devices: the messages the update agent reads.

The rollout side holds no signing key: it forwards a manifest signed elsewhere, points at the
bundle (a ``file://`` or presigned HTTPS URL, or MQTT chunks for small bundles), and adds the
root chain a device may need to walk first. Whatever it sends, a device installs only what the
signed manifest names (docs/security.md).
"""

from __future__ import annotations

import hashlib

from cogbert_edge.errors import ConfigError
from cogbert_edge.link.mqtt import MqttLink, PublishHandle
from cogbert_edge.wire.messages import Chunk, ReleaseOffer
from cogbert_edge.wire.topics import device_topic, fleet_release

__all__ = ["release_message", "chunk_messages", "publish_release"]

CHUNK_BYTES = 256 * 1024


def release_message(manifest: bytes, *, url: str | None = None, chunks: int | None = None,
                    root_chain: list[bytes] | tuple[bytes, ...] = ()) -> bytes:
    return ReleaseOffer(manifest, url=url, chunks=chunks, root_chain=tuple(root_chain)).encode()


def chunk_messages(bundle: bytes, size: int = CHUNK_BYTES) -> list[bytes]:
    sha = hashlib.sha256(bundle).hexdigest()
    return [Chunk(sha, i, bundle[off:off + size]).encode() for i, off in enumerate(range(0, len(bundle), size))]


def publish_release(link: MqttLink, fleet: str, manifest: bytes, *, url: str | None = None,
                    bundle: bytes | None = None, device: str | None = None,
                    root_chain: list[bytes] | tuple[bytes, ...] = ()) -> list[PublishHandle]:
    """Offer a release to one device, or to the whole fleet (a retained message on the fleet's
    release topic, so devices that connect later get it too). Small bundles may travel as
    chunks to one device (``bundle=``); fleet-wide releases need a ``url``."""
    topic = device_topic(fleet, device, "release") if device else fleet_release(fleet)
    if bundle is not None:
        if device is None:
            raise ConfigError("chunked bundles go to one device at a time; fleet-wide releases need a url")
        parts = chunk_messages(bundle)
        handles = [link.publish(topic, release_message(manifest, chunks=len(parts), root_chain=root_chain))]
        return handles + [link.publish(topic, p) for p in parts]
    return [link.publish(topic, release_message(manifest, url=url, root_chain=root_chain), retain=device is None)]
