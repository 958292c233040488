"""A test-only bucket backend for fault injection: `faulty://<folder>` is the local-folder bucket plus faults.

Importing this module registers the scheme in the bucket registry (`shared.bucket.register_backend`), so any code that
opens a bucket by address goes through it: a Publisher or Follower in the test process, or a service started through
`with_faults.py` (which imports this module, then runs the service's own `__main__`). Faults come from the JSON file
named by `DWS_FAULTS_FILE`, re-read at every call so a test can switch them while a service runs, or in-process from
`set_faults()`:

    {"rules": [{"ops": ["download"], "path": "deltas/*", "error": "timeout", "times": 3}],
     "slow_write_s_per_mib": 0.5,
     "stall": {"path": "anchors/*", "after_bytes": 65536, "nth": 2}}

* rules: matching calls raise -- `times` times, or every time when absent -- `timeout` (TimeoutError), `io`
  (OSError EIO), `reset` (ConnectionResetError) or `bucket` (shared.errors.BucketError, what the hf:// backend raises
  once its retries are spent). Ops: read_bytes, write_bytes, upload, download, list, stat, delete.
* slow_write_s_per_mib: writes go to disk in 64 KiB chunks at this pace (the atomic write's temp file really grows).
* stall: the `nth` write (1-based, counted per process) of a matching path stores `after_bytes` bytes of its temp file
  and then blocks forever: a process killed now dies inside an upload.

Every injected failure is counted in `INJECTED` and, when `DWS_FAULTS_LOG` names a file, appended to it (one JSON line
per failure, and one `{"op": "stall", "temp": ...}` line when a write stalls) so a test can follow a child process.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

from shared.bucket import Bucket, BucketEntry, register_backend
from shared.bucket.local import LocalBucket, _atomic_write
from shared.errors import BucketError

CHUNK = 64 << 10
INJECTED: Counter = Counter()  # (op, path) -> injected failures in this process
_faults: dict | None = None
_counts: Counter = Counter()
_writes: Counter = Counter()
_lock = threading.Lock()


def set_faults(faults: dict | None) -> None:
    """In-process fault plan (overrides DWS_FAULTS_FILE); None switches faults off. Resets the counters."""
    global _faults
    with _lock:
        _faults = faults
        _counts.clear()
        _writes.clear()


def write_faults(path: str | Path, faults: dict | None) -> None:
    """Switch the faults of services that read DWS_FAULTS_FILE=path (atomically: a reader never sees half a plan)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(faults or {}))
    os.replace(tmp, path)


def _plan() -> dict:
    if _faults is not None:
        return _faults
    name = os.environ.get("DWS_FAULTS_FILE")
    if not name:
        return {}
    try:
        return json.loads(Path(name).read_text() or "{}")
    except (OSError, ValueError):
        return {}


_ERRORS = {
    "timeout": lambda op, path: TimeoutError(f"injected fault: {op} {path} timed out"),
    "io": lambda op, path: OSError(errno.EIO, f"injected fault: {op} {path}: input/output error"),
    "reset": lambda op, path: ConnectionResetError(f"injected fault: {op} {path}: connection reset"),
    "bucket": lambda op, path: BucketError(f"injected fault: {op} {path}: HTTP 503 after 5 attempts"),
}


def _record(event: dict) -> None:
    log = os.environ.get("DWS_FAULTS_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({**event, "t": time.time()}) + "\n")


def _maybe_fail(op: str, path: str) -> None:
    with _lock:
        for rule in _plan().get("rules", []):
            if op not in rule.get("ops", [op]) or not fnmatch.fnmatch(path, rule.get("path", "*")):
                continue
            key = json.dumps(rule, sort_keys=True)
            if "times" in rule and _counts[key] >= rule["times"]:
                continue
            _counts[key] += 1
            INJECTED[(op, path)] += 1
            _record({"op": op, "path": path, "error": rule["error"]})
            raise _ERRORS[rule["error"]](op, path)


class FaultyBucket(Bucket):
    def __init__(self, root: str | Path, *, create: bool = False):
        self.inner = LocalBucket(root, create=create)
        self.address = f"faulty://{self.inner.address}"

    def _slow_write(self, path: str, data_source) -> bool:
        """Write through the local bucket's own atomic write, slowly or stalling; False when no pacing applies."""
        plan = _plan()
        pace = float(plan.get("slow_write_s_per_mib", 0) or 0)
        stall = plan.get("stall") or {}
        stall_here = False
        if stall and fnmatch.fnmatch(path, stall.get("path", "*")):
            with _lock:
                _writes[stall["path"]] += 1
                stall_here = _writes[stall["path"]] == int(stall.get("nth", 1))
        if not pace and not stall_here:
            return False

        def writer(f):
            written = 0
            while chunk := data_source(CHUNK):
                if stall_here and written + len(chunk) >= int(stall.get("after_bytes", 0)):
                    f.write(chunk[: max(0, int(stall.get("after_bytes", 0)) - written)])
                    f.flush()
                    os.fsync(f.fileno())
                    _record({"op": "stall", "path": path, "temp": os.readlink(f"/proc/self/fd/{f.fileno()}"),
                             "bytes": f.tell()})
                    while True:  # the test SIGKILLs us here, halfway through the file
                        time.sleep(3600)
                f.write(chunk)
                written += len(chunk)
                if pace:
                    f.flush()
                    time.sleep(pace * len(chunk) / (1 << 20))

        _atomic_write(self.inner._p(path), writer)
        return True

    def read_bytes(self, path: str) -> bytes:
        _maybe_fail("read_bytes", path)
        return self.inner.read_bytes(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        _maybe_fail("write_bytes", path)
        view = memoryview(data)
        pos = [0]

        def source(n: int) -> bytes:
            chunk = bytes(view[pos[0]:pos[0] + n])
            pos[0] += len(chunk)
            return chunk

        if not self._slow_write(path, source):
            self.inner.write_bytes(path, data)

    def upload(self, local_path: str | Path, path: str) -> None:
        _maybe_fail("upload", path)
        with open(local_path, "rb") as src:
            if self._slow_write(path, src.read):
                return
        self.inner.upload(local_path, path)

    def download(self, path: str, local_path: str | Path) -> None:
        _maybe_fail("download", path)
        self.inner.download(path, local_path)

    def list(self, prefix: str = "") -> list[BucketEntry]:
        _maybe_fail("list", prefix)
        return self.inner.list(prefix)

    def stat(self, path: str) -> BucketEntry | None:
        _maybe_fail("stat", path)
        return self.inner.stat(path)

    def delete(self, paths) -> None:
        paths = list(paths)
        for p in paths:
            _maybe_fail("delete", p)
        self.inner.delete(paths)


@register_backend("faulty")
def _open_faulty(address: str, *, token: str | None = None, create: bool = False) -> FaultyBucket:
    return FaultyBucket(address[len("faulty://"):], create=create)
