"""The trainer side: publish each new policy version to the bucket as a lossless sparse delta or a full anchor.

`Publisher.publish(named_tensors, version)` snapshots the weights cast to bf16 (the only blocking part), refuses
NaN/Inf, and queues the snapshot. A background thread compares it bit for bit with the last *published* bf16 state
-- so it works with any optimizer and any number of steps between publishes, with no optimizer hooks -- encodes a
delta and/or an anchor, stores the files, then commits them with a new manifest, then deletes what retention dropped
(docs/design.md §3.4 rules 2 and 6). `flush()` waits for the queue to drain and re-raises any background failure.

A publisher pointed at a bucket that already has a manifest continues its history: it checks the model identity,
refuses versions that are not newer than the latest, and rebuilds the last published state from anchor + deltas.

One writer per bucket: the owner lease (`shared.lease.BucketLease`, `owner.json`) is claimed at start and checked
before every upload and commit. This publisher holds the whole model in one process; a sharded (FSDP2) trainer uses
`shared.sharded.ShardedPublisher`, where each rank publishes its own rows as a part of the version.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shared.bucket import Bucket, open_bucket
from shared.digest import DigestBuilder, ElementSum, algorithm_of
from shared.errors import (
    DwsError,
    ModelMismatchError,
    NonFiniteWeightsError,
    OwnerConflictError,
    PublishError,
)
from shared.formats import TensorChange, bits, diff_state, encode_delta, write_anchor
from shared.lease import BucketLease, default_run_id
from shared.manifest import (
    FileEntry,
    Manifest,
    ModelIdentity,
    TensorSpec,
    anchor_path,
    delta_path,
    read_manifest,
    sha256_file,
    write_manifest,
)

log = logging.getLogger("dws.publisher")


@dataclass(frozen=True)
class PublishReport:
    """What one publish did; the trainer logs it and the dashboard plots it."""

    version: int
    base: int | None
    kinds: tuple[str, ...]  # ("delta",), ("anchor",) or ("delta", "anchor")
    changed: int
    total: int
    delta_bytes: int | None
    anchor_bytes: int | None
    snapshot_s: float  # blocking part, in the training loop
    encode_s: float
    digest_s: float
    upload_s: float
    digest: str

    @property
    def sparsity(self) -> float:
        """Fraction of elements unchanged since the previous published version."""
        return 1.0 - self.changed / self.total if self.total else 1.0

    @property
    def bytes(self) -> int:
        return (self.delta_bytes or 0) + (self.anchor_bytes or 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "bytes": self.bytes}


def _to_cpu_bf16(t: torch.Tensor) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # FSDP2 / DTensor: gather the full parameter on every rank
        t = t.full_tensor()
    # copy=True: a CPU bf16 parameter would otherwise be aliased and keep changing under us.
    return t.detach().to(device="cpu", dtype=torch.bfloat16, copy=True)


class BackgroundPublishing:
    """What a caller sees of a publisher between two `publish` calls: versions queued for one background thread,
    `flush()` to wait for them, `close()` to stop, errors of the background work raised on the caller's next call.
    Shared by `Publisher` and the per-rank `shared.sharded.ShardedPublisher`. The hazard: a failure in the background
    thread must surface in the training loop, never be lost in a thread that nobody joins."""

    _queue: queue.Queue
    _thread: threading.Thread
    _lock: threading.Lock
    _errors: list[BaseException]
    _lease: BucketLease | None
    #: errors raised as they are (the caller must see the type); any other one is wrapped in PublishError
    _passthrough: tuple[type[BaseException], ...] = (OwnerConflictError,)

    @staticmethod
    def _check_policy(*, anchor_every: int, anchor_fraction: float, keep_anchors: int, queue_size: int) -> None:
        if anchor_every < 1 or keep_anchors < 1 or not (0 < anchor_fraction) or queue_size < 1:
            raise ValueError("anchor_every, keep_anchors and queue_size must be >= 1 and anchor_fraction > 0")

    def _configure(self, bucket: Bucket | str, *, token: str | None, model_name: str, anchor_every: int,
                   anchor_fraction: float, keep_anchors: int, encoding: str, on_report: Callable | None,
                   run_id: str | None) -> None:
        """The settings every publisher keeps: where, what it publishes, and its anchor and retention policy."""
        self.bucket = bucket if isinstance(bucket, Bucket) else open_bucket(bucket, token=token, create=True)
        self.model_name = model_name
        self.anchor_every = anchor_every
        self.anchor_fraction = anchor_fraction
        self.keep_anchors = keep_anchors
        self.encoding = encoding
        self.on_report = on_report
        self.run_id = run_id or default_run_id()

    def _who(self) -> str:
        return "publisher"

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued version is stored (and committed, where this process commits); raise
        PublishError if any failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self._who()} still has {self._queue.unfinished_tasks} version(s) in flight")
            time.sleep(0.01)
        self._raise_pending()

    def close(self) -> None:
        """Flush and stop; the bucket's lease (if this process holds it) is released. Not a collective: a dead rank
        must not hang the others."""
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join(timeout=5)
            if self._lease is not None:
                self._lease.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_pending(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            if isinstance(errors[0], self._passthrough):
                raise errors[0]
            raise PublishError(f"{self._who()}: background publish failed: {errors[0]}") from errors[0]


class Publisher(BackgroundPublishing):
    def __init__(
        self,
        bucket: Bucket | str,
        *,
        model_name: str = "",
        anchor_every: int = 10,
        anchor_fraction: float = 0.5,
        keep_anchors: int = 2,
        encoding: str = "compact",
        queue_size: int = 2,
        token: str | None = None,
        on_report: Callable[[PublishReport], None] | None = None,
        spool_dir: str | Path | None = None,
        run_id: str | None = None,
        take_over: bool = False,
        lease_ttl_s: float = 120.0,
        lease_settle_s: float = 0.5,
    ):
        self._check_policy(anchor_every=anchor_every, anchor_fraction=anchor_fraction, keep_anchors=keep_anchors,
                           queue_size=queue_size)
        self._configure(bucket, token=token, model_name=model_name, anchor_every=anchor_every,
                        anchor_fraction=anchor_fraction, keep_anchors=keep_anchors, encoding=encoding,
                        on_report=on_report, run_id=run_id)
        self.owner = f"{self.run_id} ({socket.gethostname()}:{os.getpid()})"
        self.reports: list[PublishReport] = []
        # Claim before reading the manifest: a previous owner's last commit then lands before our read, not after.
        self._lease = BucketLease(self.bucket, run_id=self.run_id, ttl_s=lease_ttl_s, take_over=take_over,
                                  settle_s=lease_settle_s)
        self._lease.claim()
        self._spool = Path(spool_dir) if spool_dir else Path(tempfile.mkdtemp(prefix="dws-spool-"))
        self._spool.mkdir(parents=True, exist_ok=True)  # a spool_dir given by path may not exist yet
        self._manifest: Manifest | None = read_manifest(self.bucket)
        self._prev: dict[str, torch.Tensor] | None = None
        self._esum: ElementSum | None = None  # digest element sum of `_prev`, kept up to date in O(changed)
        # The model every publish must match: the bucket's, or else the first snapshot's.
        self._shapes = self._manifest.model.shapes if self._manifest else None
        self._prev_version: int | None = self._manifest.latest if self._manifest else None
        self._last_queued = self._prev_version
        self._rebuild_tried = False
        self._errors: list[BaseException] = []
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dws-publisher", daemon=True)
        self._thread.start()
        where = f"continuing from v{self._prev_version}" if self._manifest else "empty bucket"
        log.info("publisher on %s (%s), encoding=%s anchor_every=%d anchor_fraction=%.2f keep_anchors=%d",
                 self.bucket.address, where, encoding, anchor_every, anchor_fraction, keep_anchors)

    # ----------------------------------------------------------------------------------------------- public API
    @property
    def latest_version(self) -> int | None:
        return self._manifest.latest if self._manifest else None

    def publish(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                version: int) -> Future:
        """Snapshot and queue a version; returns a Future of its PublishReport. Blocks only if the queue is full."""
        self._raise_pending()
        if self._lease.lost is not None:
            raise self._lease.lost
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        if self._last_queued is not None and version <= self._last_queued:
            raise ValueError(f"version {version} is not newer than v{self._last_queued} already published")
        t0 = time.perf_counter()
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        snap = {name: _to_cpu_bf16(t) for name, t in items}
        if not snap:
            raise ValueError("nothing to publish: no tensors given")
        bad = [n for n, t in snap.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteWeightsError(
                f"refusing to publish v{version}: {len(bad)} tensor(s) hold NaN or Inf after the bf16 cast "
                f"(first: {', '.join(bad[:3])}); nothing was written")
        self._check_identity(snap)
        fut: Future = Future()
        self._last_queued = version
        self._queue.put((version, snap, time.perf_counter() - t0, fut))
        return fut

    # ----------------------------------------------------------------------------------------------- internals
    def _identity(self, snap: Mapping[str, torch.Tensor]) -> ModelIdentity:
        return ModelIdentity(name=self.model_name,
                             tensors={k: TensorSpec(shape=tuple(t.shape)) for k, t in sorted(snap.items())})

    def _check_identity(self, snap: Mapping[str, torch.Tensor]) -> None:
        mine = self._identity(snap).shapes
        if self._shapes is None:
            self._shapes = mine
            return
        theirs = self._shapes
        if mine != theirs:
            missing = sorted(set(theirs) - set(mine))[:3]
            extra = sorted(set(mine) - set(theirs))[:3]
            reshaped = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])[:3]
            raise ModelMismatchError(
                f"weights do not match the model in bucket {self.bucket.address} "
                f"(missing {missing}, unexpected {extra}, reshaped {reshaped}); use another bucket or prefix")

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            version, snap, snapshot_s, fut = job
            try:
                report = self._publish_now(version, snap, snapshot_s)
                self.reports.append(report)
                fut.set_result(report)
                if self.on_report:
                    self.on_report(report)
            except BaseException as exc:  # noqa: BLE001 -- surfaced to the trainer via flush()/publish()
                log.error("publishing v%d failed: %s", version, exc)
                with self._lock:
                    self._errors.append(exc)
                fut.set_exception(exc)
            finally:
                self._queue.task_done()

    def _load_previous(self) -> None:
        """A publisher continuing a bucket's history needs the last published state to diff against."""
        from shared.follower import Follower

        log.info("rebuilding v%d from the bucket to continue its history", self._manifest.latest)
        try:
            version, state = Follower(self.bucket).materialize()
        except DwsError as exc:
            # History we cannot reproduce bit-exactly cannot be diffed against: the next version goes out as an
            # anchor, which also heals every replica.
            log.warning("cannot rebuild v%d from the bucket (%s); publishing the next version as an anchor",
                        self._manifest.latest, exc)
            self._prev_version = self._manifest.latest
            return
        self._prev, self._prev_version = state, version

    def _publish_now(self, version: int, snap: dict[str, torch.Tensor], snapshot_s: float) -> PublishReport:
        self._lease.check(f"uploading v{version}")
        if self._manifest is not None and self._prev is None and not self._rebuild_tried:
            self._rebuild_tried = True
            self._load_previous()
        total = sum(t.numel() for t in snap.values())
        t0 = time.perf_counter()
        delta_bytes_blob: bytes | None = None
        changed = total
        changes: dict[str, TensorChange] = {}
        if self._prev is not None:
            # One parallel read of both versions finds the changes (and what the ctx encoder needs on the way).
            changes = diff_state(snap, self._prev, encoding=self.encoding)
            changed = sum(int(ch.positions.size) for ch in changes.values())
            delta_bytes_blob = encode_delta(changes, version=version, base=self._prev_version, total=total,
                                            encoding=self.encoding)
        encode_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        shapes = {name: tuple(t.shape) for name, t in snap.items()}
        if self._prev is not None and self._esum is not None:
            # O(changed): the previous version's element sum, minus the old values' terms, plus the new ones'.
            esum = ElementSum(self._esum.value)
            for name, ch in changes.items():
                esum.replace(name, ch.shape, ch.positions, ch.base_bits, ch.new_bits)
        else:
            builder = DigestBuilder()
            for name in sorted(snap):
                builder.update(name, snap[name])
            esum = ElementSum(builder.partial_sum)
        digest = esum.digest(shapes)
        digest_s = time.perf_counter() - t0

        want_anchor = self._wants_anchor(len(delta_bytes_blob) if delta_bytes_blob is not None else None, total)
        t0 = time.perf_counter()
        new_files: list[FileEntry] = []
        kinds: list[str] = []
        delta_bytes = anchor_bytes = None
        anchor_size_estimate = 2 * total
        # At an anchor version a small delta is still worth storing: replicas that are up to date fetch it instead.
        if delta_bytes_blob is not None and not (want_anchor and len(delta_bytes_blob) >= anchor_size_estimate):
            local = self._spool / f"delta-v{version}.safetensors"
            local.write_bytes(delta_bytes_blob)
            entry = FileEntry(version=version, path=delta_path(version), bytes=len(delta_bytes_blob),
                              sha256=sha256_file(local), digest=digest, base=self._prev_version, changed=changed,
                              encoding=self.encoding)
            self.bucket.upload(local, entry.path)
            local.unlink()
            new_files.append(entry)
            kinds.append("delta")
            delta_bytes = entry.bytes
        if want_anchor or delta_bytes is None:
            local = self._spool / f"anchor-v{version}.safetensors"
            size = write_anchor(snap, local, version=version)
            entry = FileEntry(version=version, path=anchor_path(version), bytes=size, sha256=sha256_file(local),
                              digest=digest)
            self.bucket.upload(local, entry.path)
            local.unlink()
            new_files.append(entry)
            kinds.append("anchor")
            anchor_bytes = size
        dropped = self._commit(version, digest, snap, new_files)
        upload_s = time.perf_counter() - t0

        report = PublishReport(version=version, base=self._prev_version if "delta" in kinds else None,
                               kinds=tuple(kinds), changed=changed, total=total, delta_bytes=delta_bytes,
                               anchor_bytes=anchor_bytes, snapshot_s=snapshot_s, encode_s=encode_s,
                               digest_s=digest_s, upload_s=upload_s, digest=digest)
        self._prev, self._prev_version, self._esum = snap, version, esum
        log.info("published v%d %s: %d/%d changed (%.3f%%), %s, encode %.3fs upload %.3fs%s", version,
                 "+".join(kinds), changed, total, 100.0 * changed / max(total, 1),
                 ", ".join(f"{k} {b:,} B" for k, b in (("delta", delta_bytes), ("anchor", anchor_bytes)) if b),
                 encode_s, upload_s, f", retired {len(dropped)} file(s)" if dropped else "")
        return report

    def _wants_anchor(self, delta_size: int | None, total: int) -> bool:
        m = self._manifest
        if delta_size is None or m is None or not m.anchors:
            return True
        last = m.anchors[-1]
        since = [d for d in m.deltas if d.version > last.version]
        if len(since) + 1 >= self.anchor_every:
            return True
        # Bound catch-up cost: a newcomer downloads the anchor plus every delta after it.
        return sum(d.bytes for d in since) + delta_size > self.anchor_fraction * last.bytes

    def _commit(self, version: int, digest: str, snap, new_files: list[FileEntry]) -> list[str]:
        m = self._manifest
        anchors = list(m.anchors) if m else []
        deltas = list(m.deltas) if m else []
        for e in new_files:
            (anchors if e.base is None else deltas).append(e)
        anchors = anchors[-self.keep_anchors:]
        oldest = anchors[0].version
        deltas = [d for d in deltas if d.version > oldest]
        manifest = Manifest(model=m.model if m else self._identity(snap), latest=version, latest_digest=digest,
                            digest=algorithm_of(digest), anchors=tuple(anchors), deltas=tuple(deltas),
                            owner=self.owner)
        self._lease.check(f"committing v{version}")
        write_manifest(self.bucket, manifest)
        dropped = sorted((m.paths if m else set()) - manifest.paths)
        self._manifest = manifest
        if dropped:
            # Retention (rule 6): only now that no stored manifest names them. A failure here leaves garbage only.
            try:
                self.bucket.delete(dropped)
            except Exception as exc:  # noqa: BLE001
                log.warning("could not delete retired files %s: %s", dropped, exc)
        return dropped
