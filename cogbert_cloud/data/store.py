"""The object store the cloud keeps experience, checkpoints and releases in.

    store = open_store("file:///var/lib/cogbert")         # the default: a local directory
    store = open_store("s3://bucket/prefix")              # S3 through boto3
    store = open_store("s3://bucket/prefix?endpoint=http://127.0.0.1:9000")

Objects are immutable blobs addressed by ``/``-separated keys. ``put`` is atomic (readers see
the old object or the new one, never a part): the file store writes a temporary file, fsyncs
it, renames it over the target and fsyncs the directory; S3 PUTs are atomic by nature. The S3
endpoint can also come from ``$COGBERT_S3_ENDPOINT`` (MinIO, moto, Ceph, ...); credentials come
from boto3's usual chain (environment, profile, instance role).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

from cogbert_cloud.errors import StoreError
from cogbert_edge._internal.fs import atomic_write, makedirs_durable

__all__ = ["ObjectStore", "FileStore", "S3Store", "open_store"]

_KEY_RE = re.compile(r"^[A-Za-z0-9_.=\-]+(/[A-Za-z0-9_.=\-]+)*$")


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or ".." in key.split("/"):
        raise StoreError(f"invalid object key {key[:80]!r}")
    return key


class FileStore:
    """Objects as files under a root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            try:
                atomic_write(path, data)
            except FileNotFoundError:     # the first object under this prefix
                makedirs_durable(path.parent)
                atomic_write(path, data)
        except OSError as e:
            raise StoreError(f"cannot write {key}: {e.strerror or e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no object {key}") from None
        except OSError as e:
            raise StoreError(f"cannot read {key}: {e.strerror or e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return
        for dirpath, _dirs, files in os.walk(start):
            for name in sorted(files):
                if name.startswith("."):      # temporary files of writes in progress
                    continue
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                if key.startswith(prefix):
                    yield key

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass


class S3Store:
    """Objects in an S3 bucket under a prefix, through boto3."""

    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None,
                 region: str | None = None) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StoreError("s3:// stores need boto3: pip install 'cogbert[cloud]'") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint or os.environ.get("COGBERT_S3_ENDPOINT") or None
        self._client = boto3.client(
            "s3", endpoint_url=self.endpoint,
            region_name=region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30))
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors = (BotoCoreError, ClientError)
        self.url = f"s3://{bucket}/{self.prefix}" + (f"?endpoint={self.endpoint}" if self.endpoint else "")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except self._errors as e:
            raise StoreError(f"cannot write s3://{self.bucket}/{self._key(key)}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._errors as e:
            raise StoreError(f"cannot read s3://{self.bucket}/{self._key(key)}: {e}") from e

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except self._errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreError(f"cannot check s3://{self.bucket}/{self._key(key)}: {e}") from e

    def list(self, prefix: str = "") -> Iterator[str]:
        if prefix:
            check_key(prefix.rstrip("/"))
        base = self.prefix + "/" if self.prefix else ""
        full = base + prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][cut:]
        except self._errors as e:
            raise StoreError(f"cannot list s3://{self.bucket}/{full}: {e}") from e

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except self._errors as e:
            raise StoreError(f"cannot delete s3://{self.bucket}/{self._key(key)}: {e}") from e

    def presign(self, key: str, expires: int = 3600) -> str:
        """An HTTPS URL that reads ``key`` without credentials until it expires."""
        return self._client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                         "Key": self._key(key)},
                                                   ExpiresIn=expires)


def open_store(url: str) -> ObjectStore:
    """``file://DIR`` (or a plain path) or ``s3://BUCKET[/PREFIX][?endpoint=URL&region=R]``."""
    u = urlparse(url)
    if u.scheme == "":
        return FileStore(Path(url))
    if u.scheme == "file":
        # file:///abs/dir, and the common file://./rel/dir, which urlparse reads as host "."
        if u.netloc in (".", ".."):
            return FileStore(Path(u.netloc + u.path))
        if u.netloc not in ("", "localhost"):
            raise StoreError(f"{url!r}: a file store URL names a local directory: file:///ABS/DIR or file://./REL/DIR")
        return FileStore(Path(u.path))
    if u.scheme == "s3":
        if not u.netloc:
            raise StoreError(f"{url!r}: s3 URLs need a bucket: s3://BUCKET/PREFIX")
        q = parse_qs(u.query)
        endpoint, region = (q.get("endpoint") or [""])[0], (q.get("region") or [""])[0]
        # parse_qs leaves out empty values, so "" here means the URL did not give one.
        return S3Store(u.netloc, u.path, endpoint=endpoint or None, region=region or None)
    raise StoreError(f"unsupported store URL {url!r}: use file://DIR or s3://BUCKET/PREFIX")
