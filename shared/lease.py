"""The owner lease: one writer per bucket, kept in `owner.json` (run id, host, pid, heartbeat).

A second trainer pointed at the same bucket by mistake refuses with `OwnerConflictError` instead of interleaving
versions, while a restarted trainer of the same run -- or any trainer once the owner's lease expired -- continues the
history. Only publishers (the single-process `Publisher`, rank 0 of a `ShardedPublisher`) read or write it; replicas
ignore it. It lives apart from the publishers so that both kinds share one implementation.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.bucket import Bucket
from shared.errors import BucketFileNotFound, FormatError, OwnerConflictError

log = logging.getLogger("dws.lease")

OWNER_PATH = "owner.json"
# One claimant per process: several Publisher objects of one run in one process (a trainer restarting in place,
# tests) are the same writer; another process is another claimant, even with the same run id.
_CLAIMANT = uuid.uuid4().hex


def default_run_id() -> str:
    """DWS_RUN_ID, else the Space's id (stable across restarts of that Space), else this host and process."""
    return os.environ.get("DWS_RUN_ID") or os.environ.get("SPACE_ID") or f"{socket.gethostname()}-{os.getpid()}"


class OwnerRecord(BaseModel):
    """`owner.json`: who writes this bucket. Only publishers read it; replicas ignore it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dws-owner"] = "dws-owner"
    run_id: str = Field(min_length=1, max_length=256)
    claimant: str = Field(min_length=1, max_length=64)
    host: str = Field(max_length=256)
    pid: int
    created: float
    heartbeat: float
    ttl_s: float = Field(gt=0)
    released: bool = False

    def age(self) -> float:
        return time.time() - self.heartbeat

    @property
    def expired(self) -> bool:
        return self.age() > self.ttl_s

    def describe(self) -> str:
        state = ", released" if self.released else (", lease expired" if self.expired else "")
        return (f"run {self.run_id!r} on host {self.host} (pid {self.pid}), last heartbeat {self.age():.0f} s ago"
                f"{state}")


class BucketLease:
    """A publisher's claim on a bucket, kept in `owner.json`.

    * `claim()` (publisher start) writes our record when there is none, it is released, it is this process's, it
      has our run id (a restarted trainer continues at once), its heartbeat is older than its TTL, or `take_over`;
      anything else raises OwnerConflictError naming the owner. A new claimant then waits `settle_s`, re-reads and
      compares: if another claimant's record is there, that one won and we refuse.
    * `check()` runs before every upload and before every manifest write: the record must still be ours, otherwise
      this publisher is marked lost and writes nothing more. It also refreshes the heartbeat when due.
    * A heartbeat thread refreshes the record every ttl/4 while the process lives; `release()` (close) marks it
      released so that the next trainer need not wait for the TTL.

    Race window, honestly: the bucket API has no compare-and-swap, so this is a lease by convention, not a lock.
    Two claimants starting together are caught by write / settle / re-read (the later writer wins) unless one of them
    stalls longer than `settle_s` between its read and its write; then both believe they own the bucket until the
    earlier one's next check (before its next upload) sees the other record and stops it. The interval that stays
    open is the one between a check and the write that follows it (one small read, then the upload or manifest
    write): a take-over landing exactly there lets the old owner store one more file or commit one more version.
    A commit of the old owner is dropped by the new owner's next commit, which is built on the manifest it read at
    start (the files become unlisted garbage). A file the old owner stores under a path the new owner's manifest
    lists fails its sha256 check on every replica, which keeps serving its last good version until the new owner's
    next anchor. Every manifest stays self-consistent and no replica ever applies wrong weights. Heartbeats are
    stamped with each writer's clock, so TTLs must be far larger than clock skew.
    """

    def __init__(self, bucket: Bucket, *, run_id: str, ttl_s: float = 120.0, take_over: bool = False,
                 settle_s: float = 0.5):
        if ttl_s <= 0 or settle_s < 0:
            raise ValueError("lease ttl_s must be > 0 and settle_s >= 0")
        self.bucket = bucket
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.take_over = take_over
        self.settle_s = settle_s
        self.lost: OwnerConflictError | None = None
        self._created = time.time()
        self._last_beat = 0.0
        self._io = threading.Lock()  # the heartbeat thread and the publisher thread share the record
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------------- record I/O
    def read(self) -> OwnerRecord | None:
        try:
            data = self.bucket.read_bytes(OWNER_PATH)
        except BucketFileNotFound:
            return None
        try:
            return OwnerRecord.model_validate_json(data)
        except ValidationError:
            raise FormatError(f"{self.bucket.address}/{OWNER_PATH} is not a dws owner record; remove it, or start "
                              "the publisher with take_over=True (--take-over)") from None

    def _mine(self, rec: OwnerRecord | None) -> bool:
        return rec is not None and rec.claimant == _CLAIMANT and rec.run_id == self.run_id

    def _write(self, *, released: bool = False) -> None:
        now = time.time()
        rec = OwnerRecord(run_id=self.run_id, claimant=_CLAIMANT, host=socket.gethostname(), pid=os.getpid(),
                          created=self._created, heartbeat=now, ttl_s=self.ttl_s, released=released)
        self.bucket.write_bytes(OWNER_PATH, rec.model_dump_json(indent=1).encode())
        self._last_beat = now

    def _lose(self, cur: OwnerRecord | None, doing: str) -> OwnerConflictError:
        who = cur.describe() if cur is not None else "a writer whose owner.json is not a dws owner record"
        self.lost = OwnerConflictError(f"bucket {self.bucket.address} was taken over by {who}; this publisher "
                                       f"stopped before {doing} and writes nothing more")
        log.error("%s", self.lost)
        return self.lost

    # --------------------------------------------------------------------------------------------- protocol
    def claim(self) -> None:
        addr = self.bucket.address
        with self._io:
            try:
                cur = self.read()
            except FormatError:
                if not self.take_over:
                    raise
                cur = None
            fresh = not self._mine(cur)
            if cur is not None and fresh and not cur.released:
                if cur.run_id == self.run_id:
                    log.info("bucket %s: continuing run %r after a restart (previous writer: %s)", addr, self.run_id,
                             cur.describe())
                elif self.take_over:
                    log.warning("bucket %s: taking it over from %s (take-over requested)", addr, cur.describe())
                elif cur.expired:
                    log.warning("bucket %s: the lease of %s is older than its TTL (%.0f s); taking over", addr,
                                cur.describe(), cur.ttl_s)
                else:
                    raise OwnerConflictError(
                        f"bucket {addr} is being written by {cur.describe()}; refusing to interleave versions with "
                        f"it. Use another bucket or prefix, stop that trainer (its lease then expires "
                        f"{cur.ttl_s:.0f} s after its last heartbeat), or take the bucket over with --take-over "
                        f"(Publisher(take_over=True)); this publisher is run {self.run_id!r}")
            if cur is not None and not fresh:
                self._created = cur.created
                if not cur.released and cur.age() < self.ttl_s / 8:
                    # This process already holds a fresh lease (another Publisher of the run): nothing to write.
                    self._last_beat = cur.heartbeat
                    self._start_heartbeat()
                    return
            self._write()
            if fresh and self.settle_s:
                time.sleep(self.settle_s)  # let a claimant that read "free" at the same moment land its write
            after = self.read()
            if not self._mine(after):
                raise OwnerConflictError(
                    f"bucket {addr}: {after.describe() if after else 'another writer'} claimed it at the same moment "
                    f"as this publisher (run {self.run_id!r}), and won; refusing to interleave versions with it")
        log.info("bucket %s: owned by run %r (lease TTL %.0f s)", addr, self.run_id, self.ttl_s)
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dws-owner-heartbeat", daemon=True)
        self._thread.start()

    def check(self, doing: str) -> None:
        """Before writing anything to the bucket: raise OwnerConflictError if we are no longer its owner."""
        if self.lost is not None:
            raise self.lost
        with self._io:
            try:
                cur = self.read()
            except FormatError:
                raise self._lose(None, doing) from None
            if cur is None:
                # Removed by hand: nobody else claims the bucket, so the writer that is still running does.
                log.warning("bucket %s: %s disappeared; claiming it again for run %r", self.bucket.address,
                            OWNER_PATH, self.run_id)
                self._write()
                return
            if not self._mine(cur):
                raise self._lose(cur, doing)
            if time.time() - self._last_beat > self.ttl_s / 8:
                self._write()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                with self._io:
                    cur = self.read()
                    if cur is None:
                        return  # gone (or its folder is): never recreate it from here; check() decides
                    if not self._mine(cur):
                        self._lose(cur, "its next write")
                        return
                    self._write()
            except Exception as exc:  # noqa: BLE001 -- a hiccup: the next beat, or the next publish, tries again
                log.warning("bucket %s: could not refresh the owner lease: %s", self.bucket.address, exc)

    def release(self) -> None:
        """Mark the record released (a clean close): the next trainer on this bucket need not wait for the TTL."""
        self._stop.set()
        if self.lost is not None:
            return
        with self._io:
            try:
                if self._mine(self.read()):
                    self._write(released=True)
            except Exception as exc:  # noqa: BLE001 -- the lease then simply expires
                log.warning("bucket %s: could not release the owner lease: %s", self.bucket.address, exc)


__all__ = ["OWNER_PATH", "BucketLease", "OwnerRecord", "default_run_id"]
