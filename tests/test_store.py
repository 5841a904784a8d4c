"""The object store: a local directory or S3 (moto's server), one interface, atomic puts."""

from __future__ import annotations

import os
import urllib.request

import pytest

from cogbert_cloud.data.store import FileStore, open_store
from cogbert_cloud.errors import StoreError

from .s3server import s3  # noqa: F401


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    server = request.getfixturevalue("s3")
    for k, v in server["env"].items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return open_store(f"s3://fleet/t-{os.getpid()}-{id(request)}?endpoint={server['endpoint']}")


def test_put_get_exists_list_delete(store):
    store.put("experience/f/2026-01-01/d/1-2.cbx", b"one")
    store.put("experience/f/2026-01-01/d/3-4.cbx", b"two")
    store.put("checkpoints/x.bin", b"three")
    assert store.get("experience/f/2026-01-01/d/1-2.cbx") == b"one"
    assert store.exists("checkpoints/x.bin") and not store.exists("checkpoints/y.bin")
    assert sorted(store.list("experience/")) == ["experience/f/2026-01-01/d/1-2.cbx",
                                                 "experience/f/2026-01-01/d/3-4.cbx"]
    store.put("checkpoints/x.bin", b"replaced")
    assert store.get("checkpoints/x.bin") == b"replaced"
    store.delete("checkpoints/x.bin")
    assert not store.exists("checkpoints/x.bin")
    with pytest.raises(StoreError):
        store.get("checkpoints/x.bin")


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "a/../b", "", "spaces are bad"])
def test_keys_cannot_escape_or_be_ambiguous(key, tmp_path):
    with pytest.raises(StoreError):
        FileStore(tmp_path).put(key, b"x")


def test_file_store_leaves_no_partial_objects(tmp_path):
    st = FileStore(tmp_path)
    st.put("a/b.bin", b"x" * 1000)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]


def test_s3_presigned_urls_read_without_credentials(s3, monkeypatch):
    for k, v in s3["env"].items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    st = open_store(f"s3://fleet/presign?endpoint={s3['endpoint']}")
    st.put("releases/m.safetensors", b"bundle bytes")
    with urllib.request.urlopen(st.presign("releases/m.safetensors", 60), timeout=10) as r:
        assert r.read() == b"bundle bytes"


def test_unknown_schemes_are_refused():
    with pytest.raises(StoreError, match="unsupported"):
        open_store("gs://bucket/x")


def test_file_urls_name_local_directories_relative_or_absolute(tmp_path, monkeypatch):
    from cogbert_cloud.data.store import open_store
    from cogbert_cloud.errors import StoreError
    monkeypatch.chdir(tmp_path)
    assert open_store("file://./rel/store").root == (tmp_path / "rel" / "store").resolve()
    assert open_store(f"file://{tmp_path}/abs").root == tmp_path / "abs"
    assert open_store("plain/dir").root == (tmp_path / "plain" / "dir").resolve()
    with pytest.raises(StoreError, match="local directory"):
        open_store("file://otherhost/data")
