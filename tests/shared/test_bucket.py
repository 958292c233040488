"""Bucket backends. The local folder is tested for real. The Hub is unreachable here, so the hf:// backend is tested
at the huggingface_hub function boundary: its five bucket functions are replaced by an in-memory fake that records
every call, and the tests assert the exact calls made."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from shared.bucket import open_bucket
from shared.bucket.hf import HfBucket
from shared.bucket.local import LocalBucket
from shared.errors import BucketError, BucketFileNotFound, UnsafePathError


# ------------------------------------------------------------------------------------------------ local backend
def test_local_roundtrip_list_stat_delete(tmp_path):
    b = open_bucket(tmp_path / "bkt", create=True)
    assert isinstance(b, LocalBucket)
    b.write_bytes("deltas/v00000001.safetensors", b"abc")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    b.upload(src, "anchors/v00000000.safetensors")
    assert b.read_bytes("deltas/v00000001.safetensors") == b"abc"
    assert [(e.path, e.size) for e in b.list()] == [("anchors/v00000000.safetensors", 5000),
                                                    ("deltas/v00000001.safetensors", 3)]
    assert [e.path for e in b.list("deltas")] == ["deltas/v00000001.safetensors"]
    b.download("anchors/v00000000.safetensors", tmp_path / "out" / "a.bin")
    assert (tmp_path / "out" / "a.bin").read_bytes() == b"x" * 5000
    st1 = b.stat("deltas/v00000001.safetensors")
    b.write_bytes("deltas/v00000001.safetensors", b"abcd")
    assert b.stat("deltas/v00000001.safetensors") != st1, "the etag must change when the content does"
    b.delete(["deltas/v00000001.safetensors", "deltas/never-existed"])
    assert b.stat("deltas/v00000001.safetensors") is None and not b.exists("deltas/v00000001.safetensors")
    with pytest.raises(BucketFileNotFound):
        b.read_bytes("deltas/v00000001.safetensors")
    with pytest.raises(BucketFileNotFound):
        b.download("nope", tmp_path / "n")


def test_file_url_and_missing_folder(tmp_path):
    assert open_bucket(f"file://{tmp_path}").address == str(tmp_path.resolve())
    with pytest.raises(BucketFileNotFound, match="does not exist"):
        open_bucket(tmp_path / "absent")
    with pytest.raises(BucketError, match="unknown bucket address scheme 's3'"):
        open_bucket("s3://x/y")


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "a//b", "a\\b", "", "c:/x", "./a"])
def test_paths_cannot_escape(tmp_path, path):
    b = open_bucket(tmp_path, create=True)
    with pytest.raises(UnsafePathError):
        b.write_bytes(path, b"x")
    assert list(tmp_path.parent.glob("escape")) == []


def test_local_write_is_atomic_under_concurrent_readers(tmp_path):
    """Readers polling a file that is rewritten over and over must only ever see a whole old or new version."""
    b = open_bucket(tmp_path, create=True)
    versions = [bytes([i]) * 200_000 for i in range(20)]
    b.write_bytes("manifest.json", versions[0])
    seen_bad = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            data = b.read_bytes("manifest.json")
            if data not in versions:
                seen_bad.append(len(data))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in versions[1:] * 5:
        b.write_bytes("manifest.json", v)
    stop.set()
    for t in threads:
        t.join()
    assert seen_bad == []
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "no temp files may be left behind"


def test_failed_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    b = open_bucket(tmp_path, create=True)
    b.write_bytes("manifest.json", b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        b.write_bytes("manifest.json", b"new")
    monkeypatch.undo()
    assert b.read_bytes("manifest.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


# ------------------------------------------------------------------------------------------------ hf:// backend
def _http_error(status: int) -> HfHubHTTPError:
    req = httpx.Request("POST", "https://hub.invalid/api/buckets/x")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=req))


class FakeHub:
    """In-memory stand-in for huggingface_hub's bucket functions; records (function, args) of every call."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple] = []
        self.fail_next: list[BaseException] = []

    def _maybe_fail(self):
        if self.fail_next:
            raise self.fail_next.pop(0)

    def create_bucket(self, bucket_id, *, exist_ok=False, private=None, token=None, **kw):
        self.calls.append(("create_bucket", bucket_id, exist_ok, private, token))

    def batch_bucket_files(self, bucket_id, *, add=None, delete=None, copy=None, token=None):
        self.calls.append(("batch_bucket_files", bucket_id,
                           tuple((type(s).__name__, d) for s, d in (add or [])), tuple(delete or []), token))
        self._maybe_fail()
        for src, dest in add or []:
            self.files[dest] = src if isinstance(src, bytes) else Path(src).read_bytes()
        for p in delete or []:
            self.files.pop(p, None)

    def download_bucket_files(self, bucket_id, files, *, raise_on_missing_files=False, token=None):
        self.calls.append(("download_bucket_files", bucket_id, tuple(r for r, _ in files), raise_on_missing_files))
        self._maybe_fail()
        for remote, local in files:
            if remote not in self.files:
                raise EntryNotFoundError(f"{remote} missing")
            Path(local).write_bytes(self.files[remote])

    def list_bucket_tree(self, bucket_id, prefix=None, *, recursive=None, token=None):
        self.calls.append(("list_bucket_tree", bucket_id, prefix, recursive))
        self._maybe_fail()
        return [SimpleNamespace(type="file", path=p, size=len(d), xet_hash=f"h{hash(d)}")
                for p, d in sorted(self.files.items()) if prefix is None or p.startswith(prefix)]

    def get_bucket_paths_info(self, bucket_id, paths, *, token=None):
        paths = list(paths)
        self.calls.append(("get_bucket_paths_info", bucket_id, tuple(paths)))
        self._maybe_fail()
        return [SimpleNamespace(type="file", path=p, size=len(self.files[p]), xet_hash=f"h{hash(self.files[p])}")
                for p in paths if p in self.files]


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    for name in ("create_bucket", "batch_bucket_files", "download_bucket_files", "list_bucket_tree",
                 "get_bucket_paths_info"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    monkeypatch.setattr("shared.bucket.hf.wait_exponential_jitter", lambda **kw: (lambda state: 0))
    return fake


def test_hf_calls_are_exactly_these(hub, tmp_path):
    b = open_bucket("hf://buckets/alice/rl-run/exp1", token="hf_secret", create=True)
    assert isinstance(b, HfBucket) and b.bucket_id == "alice/rl-run" and b.prefix == "exp1"
    b.write_bytes("manifest.json", b"{}")
    (tmp_path / "d").write_bytes(b"delta")
    b.upload(tmp_path / "d", "deltas/v00000001.safetensors")
    assert b.read_bytes("deltas/v00000001.safetensors") == b"delta"
    assert [e.path for e in b.list()] == ["deltas/v00000001.safetensors", "manifest.json"]
    assert b.stat("manifest.json").size == 2 and b.stat("nope") is None
    b.delete(["deltas/v00000001.safetensors"])
    assert hub.calls[0] == ("create_bucket", "alice/rl-run", True, True, "hf_secret")
    assert hub.calls[1] == ("batch_bucket_files", "alice/rl-run", (("bytes", "exp1/manifest.json"),), (), "hf_secret")
    assert hub.calls[2][:3] == ("batch_bucket_files", "alice/rl-run", (("str", "exp1/deltas/v00000001.safetensors"),))
    assert hub.calls[3] == ("download_bucket_files", "alice/rl-run", ("exp1/deltas/v00000001.safetensors",), True)
    assert hub.calls[4] == ("list_bucket_tree", "alice/rl-run", "exp1", True)
    assert hub.calls[5] == ("get_bucket_paths_info", "alice/rl-run", ("exp1/manifest.json",))
    assert hub.calls[-1] == ("batch_bucket_files", "alice/rl-run", (), ("exp1/deltas/v00000001.safetensors",),
                             "hf_secret")


def test_hf_retries_transient_errors_then_succeeds(hub):
    b = open_bucket("hf://buckets/alice/run")
    hub.fail_next = [_http_error(503), ConnectionError("reset"), _http_error(429)]
    b.write_bytes("manifest.json", b"{}")
    assert [c[0] for c in hub.calls].count("batch_bucket_files") == 4
    assert hub.files["manifest.json"] == b"{}"


def test_hf_permanent_errors_fail_fast_without_leaking_the_token(hub):
    b = open_bucket("hf://buckets/alice/run", token="hf_verysecret")
    hub.fail_next = [_http_error(403)]
    with pytest.raises(BucketError, match="HTTP 403") as info:
        b.write_bytes("manifest.json", b"{}")
    assert "hf_verysecret" not in str(info.value)
    assert [c[0] for c in hub.calls].count("batch_bucket_files") == 1, "a 403 must not be retried"


def test_hf_gives_up_after_bounded_retries(hub):
    b = open_bucket("hf://buckets/alice/run")
    hub.fail_next = [_http_error(500)] * 50
    with pytest.raises(BucketError, match="HTTP 500"):
        b.read_bytes("manifest.json")
    assert len([c for c in hub.calls if c[0] == "download_bucket_files"]) == 5


def test_hf_missing_file(hub):
    with pytest.raises(BucketFileNotFound):
        open_bucket("hf://buckets/alice/run").read_bytes("manifest.json")


@pytest.mark.parametrize("address", ["hf://buckets/alice", "hf://models/alice/x", "hf://buckets//x",
                                     "hf://buckets/a/b/../c"])
def test_hf_bad_addresses(hub, address):
    with pytest.raises((BucketError, UnsafePathError)):
        open_bucket(address)
