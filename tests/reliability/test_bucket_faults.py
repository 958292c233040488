"""Bucket errors injected under a real publisher and a real follower: bounded retries with exponential backoff,
a clear `shared.errors` error once the bound is spent, and no wrong state -- the manifest never advances past a
failed upload, and a follower keeps its last good version.

hf:// -- the Hub is unreachable here, so these tests replace the huggingface_hub functions that `shared/bucket/hf.py`
calls (`create_bucket`, `batch_bucket_files`, `download_bucket_files`, `list_bucket_tree`, `get_bucket_paths_info`)
with an in-memory store that raises what the real client raises: `HfHubHTTPError` 503/429, httpx2 (huggingface_hub's
transport) timeouts and connection errors, a `requests` timeout. The backoff is recorded through the backend's sleep
hook instead of being slept. Local folder -- the test-only `faulty://` wrapper (tests/reliability/faulty_bucket.py)
fails reads and writes of the real local bucket.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import httpx
import httpx2
import huggingface_hub
import pytest
import requests
import torch
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

import faulty_bucket
import shared.bucket.hf as hf_backend
from shared.errors import BucketError, DwsError, PublishError
from shared.follower import Follower
from shared.manifest import MANIFEST_PATH
from shared.publisher import Publisher
from shared.verify import verify_bucket

TOKEN = "hf_reliabilityTOKENdoNotLeak0123456789"


def weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(version)
    base = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=base) * 0.02
    idx = torch.randint(0, w.numel(), (80,), generator=g)
    w.view(-1)[idx] += 0.01 * version
    return {"w": w, "b": torch.full((64,), 0.1 * version)}


def bf16(version: int) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in weights(version).items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def http_error(status: int) -> HfHubHTTPError:
    req = httpx2.Request("POST", "https://hub.invalid/api/buckets/alice/run/batch")
    return HfHubHTTPError(f"{status} Server Error", response=httpx2.Response(status, request=req))


TRANSIENT = {
    "503": lambda: http_error(503),
    "429": lambda: http_error(429),
    "httpx2.ReadTimeout": lambda: httpx2.ReadTimeout("read timed out"),
    "httpx2.ConnectError": lambda: httpx2.ConnectError("connection refused"),
    "httpx.RemoteProtocolError": lambda: httpx.RemoteProtocolError("peer closed connection"),
    "requests.ReadTimeout": lambda: requests.exceptions.ReadTimeout("read timed out"),
    "TimeoutError": lambda: TimeoutError("timed out"),
}


class Hub:
    """In-memory stand-in for the five huggingface_hub bucket functions, failing on demand.

    `fail(fn, path_prefix, errors)` makes calls of `fn` that touch a path starting with `path_prefix` raise the given
    errors in turn (a callable producing one error means: forever)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.rules: list[tuple[str, str, list]] = []

    def fail(self, fn: str, prefix: str, errors) -> None:
        self.rules.append((fn, prefix, errors))

    def _touch(self, fn: str, paths: tuple[str, ...]) -> None:
        self.calls.append((fn, paths))
        for rule_fn, prefix, errors in self.rules:
            if rule_fn == fn and any(p.startswith(prefix) for p in paths):
                if callable(errors):
                    raise errors()
                if errors:
                    raise errors.pop(0)

    def count(self, fn: str, prefix: str) -> int:
        return sum(1 for f, paths in self.calls if f == fn and any(p.startswith(prefix) for p in paths))

    def create_bucket(self, bucket_id, *, exist_ok=False, private=None, token=None, **kw):
        self._touch("create_bucket", ())

    def batch_bucket_files(self, bucket_id, *, add=None, delete=None, copy=None, token=None):
        assert token == TOKEN
        self._touch("batch_bucket_files", tuple(d for _, d in add or []) + tuple(delete or []))
        for src, dest in add or []:
            self.files[dest] = src if isinstance(src, bytes) else Path(src).read_bytes()
        for p in delete or []:
            self.files.pop(p, None)

    def download_bucket_files(self, bucket_id, files, *, raise_on_missing_files=False, token=None):
        self._touch("download_bucket_files", tuple(r for r, _ in files))
        for remote, local in files:
            if remote not in self.files:
                raise EntryNotFoundError(f"{remote} missing")
            Path(local).write_bytes(self.files[remote])

    def list_bucket_tree(self, bucket_id, prefix=None, *, recursive=None, token=None):
        self._touch("list_bucket_tree", (prefix or "",))
        return [SimpleNamespace(type="file", path=p, size=len(d), xet_hash=f"h{hash(d)}")
                for p, d in sorted(self.files.items()) if prefix is None or p.startswith(prefix)]

    def get_bucket_paths_info(self, bucket_id, paths, *, token=None):
        paths = tuple(paths)
        self._touch("get_bucket_paths_info", paths)
        return [SimpleNamespace(type="file", path=p, size=len(self.files[p]), xet_hash=f"h{hash(self.files[p])}")
                for p in paths if p in self.files]


@pytest.fixture
def hub(monkeypatch):
    fake = Hub()
    for name in ("create_bucket", "batch_bucket_files", "download_bucket_files", "list_bucket_tree",
                 "get_bucket_paths_info"):
        monkeypatch.setattr(huggingface_hub, name, getattr(fake, name))
    fake.waits = []
    monkeypatch.setattr(hf_backend, "_nap", fake.waits.append)  # record the backoff instead of sleeping it
    return fake


ADDRESS = "hf://buckets/alice/run/exp"


@pytest.fixture
def publisher(hub):
    """Publishers on the fake Hub, closed while it is still in place: a leaked one's lease heartbeat would
    otherwise try the real Hub later."""
    made: list[Publisher] = []

    def make(**kw) -> Publisher:
        made.append(Publisher(ADDRESS, token=TOKEN, lease_settle_s=0, **kw))
        return made[-1]

    yield make
    hub.rules.clear()
    for pub in made:
        try:
            pub.close()
        except DwsError:
            pass


def test_hf_publish_rides_out_every_kind_of_transient_error_with_growing_backoff(hub, publisher, caplog,
                                                                                 figures):
    caplog.set_level(logging.WARNING)
    pub = publisher()
    pub.publish(weights(0), 0)
    pub.flush()
    kinds = list(TRANSIENT)
    # Four failures in a row per file (the bound is 5 attempts), cycling through every kind of transient error.
    hub.fail("batch_bucket_files", "exp/deltas/", [TRANSIENT[k]() for k in kinds[:4]])
    hub.fail("batch_bucket_files", "exp/manifest.json", [TRANSIENT[k]() for k in kinds[4:]])
    pub.publish(weights(1), 1)
    pub.flush()
    manifest = Follower(ADDRESS, token=TOKEN).manifest()
    assert manifest.latest == 1 and pub.reports[-1].kinds == ("delta",)
    assert hub.count("batch_bucket_files", "exp/deltas/") == 5 and hub.count("batch_bucket_files", "exp/manifest") == 5
    waits = hub.waits
    assert len(waits) == 7
    for i, w in enumerate(waits[:4]):  # exponential: 0.5 * 2^i, plus up to 1 s of jitter, capped at 10 s
        assert 0.5 * 2 ** i <= w <= min(10.0, 0.5 * 2 ** i + 1.0), waits
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 7 and "attempt 1/5" in retries[0] and "HTTP 503" in retries[0]
    assert TOKEN not in caplog.text
    state: dict = {}
    assert Follower(ADDRESS, token=TOKEN).sync_state(state, None) == 1 and same(state, bf16(1))
    figures["hf_transient_errors"] = {"injected": 7, "kinds": kinds, "attempts_bound": hf_backend.RETRY_ATTEMPTS,
                                      "publishes_failed": 0, "waits_s": [round(w, 2) for w in waits]}


@pytest.mark.parametrize("kind", ["503", "httpx2.ReadTimeout", "requests.ReadTimeout"])
def test_hf_upload_failing_for_good_is_a_clear_error_and_the_manifest_stays(hub, publisher, caplog, kind,
                                                                           figures):
    pub = publisher()
    pub.publish(weights(0), 0)
    pub.flush()
    manifest_before = hub.files["exp/manifest.json"]
    hub.fail("batch_bucket_files", "exp/deltas/", TRANSIENT[kind])
    pub.publish(weights(1), 1)
    with pytest.raises(PublishError) as info:
        pub.flush()
    cause = info.value.__cause__
    assert isinstance(cause, BucketError), repr(cause)
    msg = str(info.value)
    assert "deltas/v00000001.safetensors" in msg and "after 5 attempts" in msg and ADDRESS in msg, msg
    assert TOKEN not in msg and TOKEN not in caplog.text
    assert hub.count("batch_bucket_files", "exp/deltas/") == hf_backend.RETRY_ATTEMPTS, "retries must be bounded"
    assert hub.files["exp/manifest.json"] == manifest_before, "a failed upload must not advance the manifest"
    # The Hub recovers: the next version is a delta against the last *committed* one, and everything replays.
    hub.rules.clear()
    pub.publish(weights(2), 2)
    pub.flush()
    assert pub.reports[-1].base == 0
    state: dict = {}
    assert Follower(ADDRESS, token=TOKEN).sync_state(state, None) == 2 and same(state, bf16(2))
    figures.setdefault("hf_permanent_upload_failure", {"tried": 0, "manifest_advanced": 0, "attempts_each": 0})
    f = figures["hf_permanent_upload_failure"]
    f["tried"] += 1
    f["attempts_each"] = hub.count("batch_bucket_files", "exp/deltas/v00000001")
    f["manifest_advanced"] += int(Follower(ADDRESS, token=TOKEN).manifest().entry(1) is not None)


def test_hf_follower_download_failures_keep_the_last_good_version(hub, publisher, caplog):
    pub = publisher(anchor_every=100)
    for v in range(3):
        pub.publish(weights(v), v)
        pub.flush()
    follower = Follower(ADDRESS, token=TOKEN)
    state = {k: v.clone() for k, v in bf16(1).items()}
    hub.fail("download_bucket_files", "exp/deltas/v00000002", lambda: httpx2.ConnectTimeout("connect timed out"))
    hub.fail("download_bucket_files", "exp/anchors/", lambda: http_error(502))
    with pytest.raises(BucketError, match="after 5 attempts"):
        follower.sync_state(state, 1)
    assert same(state, bf16(1)), "a follower whose downloads fail keeps its last good version"
    # delta path (5 attempts), then the anchor fallback (anchor v0 + deltas v1, v2, fetched in parallel): the anchor
    # fails after its 5 attempts, and v2 -- downloading beside it -- may have run its own 5 by then. Bounded either way.
    assert 5 <= hub.count("download_bucket_files", "exp/deltas/v00000002") <= 10
    assert hub.count("download_bucket_files", "exp/anchors/") == 5
    hub.rules.clear()
    assert follower.sync_state(state, 1) == 2 and same(state, bf16(2))
    assert TOKEN not in caplog.text


def test_hf_manifest_unreachable_is_a_bounded_clear_error(hub, publisher):
    publisher()
    hub.fail("get_bucket_paths_info", "exp/manifest.json", lambda: http_error(503))
    with pytest.raises(BucketError, match=r"HTTP 503 on manifest.json after 5 attempts"):
        Follower(ADDRESS, token=TOKEN).manifest()
    assert hub.count("get_bucket_paths_info", "exp/manifest.json") == 5


# ------------------------------------------------------------------------------------------------ local folder
@pytest.fixture
def faulty(tmp_path):
    faulty_bucket.set_faults(None)
    yield f"faulty://{tmp_path / 'b'}", tmp_path / "b"
    faulty_bucket.set_faults(None)


@pytest.mark.parametrize("op, error", [("upload", "io"), ("upload", "timeout"), ("write_bytes", "reset")])
def test_local_publisher_failing_to_write_does_not_advance_and_reports(faulty, caplog, op, error):
    address, folder = faulty
    pub = Publisher(address, lease_settle_s=0, anchor_every=100)
    pub.publish(weights(0), 0)
    pub.flush()
    manifest_before = (folder / MANIFEST_PATH).read_bytes()
    path = "manifest.json" if op == "write_bytes" else "deltas/*"
    faulty_bucket.set_faults({"rules": [{"ops": [op], "path": path, "error": error}]})
    pub.publish(weights(1), 1)
    with pytest.raises(PublishError, match="injected fault") as info:
        pub.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert "publishing v1 failed" in caplog.text, "the failure is logged by the publisher"
    assert (folder / MANIFEST_PATH).read_bytes() == manifest_before
    assert verify_bucket(str(folder)).ok
    faulty_bucket.set_faults(None)
    pub.publish(weights(2), 2)
    pub.flush()
    state: dict = {}
    assert Follower(folder).sync_state(state, None) == 2 and same(state, bf16(2))
    assert verify_bucket(str(folder)).ok
    pub.close()


@pytest.mark.parametrize("op, error", [("download", "io"), ("download", "bucket"), ("stat", "timeout"),
                                       ("read_bytes", "reset")])
def test_local_follower_failing_to_read_keeps_the_last_good_version(faulty, op, error):
    address, folder = faulty
    pub = Publisher(address, lease_settle_s=0, anchor_every=100)
    for v in range(3):
        pub.publish(weights(v), v)
        pub.flush()
    follower = Follower(address)
    state = {k: v.clone() for k, v in bf16(1).items()}
    path = "deltas/*" if op == "download" else "manifest.json"
    faulty_bucket.set_faults({"rules": [{"ops": [op], "path": path, "error": error}]})
    with pytest.raises((DwsError, OSError), match="injected fault"):
        follower.sync_state(state, 1)
    assert same(state, bf16(1))
    faulty_bucket.set_faults(None)
    assert follower.sync_state(state, 1) == 2 and same(state, bf16(2))
    pub.close()
