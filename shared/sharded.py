"""The trainer side for sharded training (FSDP2): every rank publishes its own rows of each tensor as one part of
the version; rank 0 commits the manifest once every part is stored (docs/design.md §3).

No rank gathers the full model, holds a full-model copy, or touches another rank's data. Each rank keeps the bf16
copy of *its own* rows as last published, diffs its new rows against it bit for bit, encodes a delta part (and an
anchor part when the version is an anchor), uploads it in a background thread, keeps the digest element sum of its
rows up to date in O(changed) (shared/digest.py: the digest is a sum of per-element terms, so rank 0 adds the ranks'
sums), and then stores a small receipt (`receipts/vNNNNNNNN.partKKKKK-of-NNNNN.json`: sizes, sha256s, element sum,
or the error that stopped it). Rank 0 waits for every receipt of the version -- bounded by `commit_timeout_s` -- and
only then writes the manifest. A rank that dies or fails leaves its receipt missing (or an error in it): the version
is never committed, rank 0 raises `PublishError` naming the missing parts, every later `publish` on every rank
raises, and a restarted run continues from the last committed version: at start each rank rebuilds its own rows
from the bucket's parts, the ranks prove together that the rebuilt rows hash to the manifest's digest, and the first
new version is a delta on it (or, when that cannot be proven, an anchor). A history written by another number of
ranks, or by a single process, is re-split: each rank reads only the stored files that overlap its rows and keeps
those rows (a single-process file is the whole model: read once at start, then dropped). Deltas coded against their
whole base tensor (`ctx`) cannot be applied to a slice of it; such a history falls back to an anchor.

Parts use the "dim0-chunks" layout (shared/manifest.py `chunk_rows`): part k of n holds rows [k*c, min((k+1)*c, R))
of every tensor with R rows, c = ceil(R/n) -- exactly FSDP2's `Shard(0)` placement on a 1-D mesh, where rank k's
`param.to_local()` is those rows. A parameter that is not a DTensor (replicated on every rank) is published the same
way: each rank takes its own rows of it. Other placements (2-D meshes, Shard(1), tensor parallelism) are refused
with a clear error.

Coordination uses a dedicated gloo process group and collectives only on the caller's thread, inside `__init__`
and `publish` (each a few bytes: which ranks saw NaN/Inf, which failed, whether this version is an anchor); uploads
and the commit wait run on a background thread, so the training loop blocks only for the bf16 snapshot of its rows.

Hooking it into a training loop: build it on every rank after `init_process_group` and `fully_shard`, then call
`publish(model.named_parameters(), step)` on every rank at the same steps (it is a collective). Hook in at the
narrowest point: TRL's async trainer streams gathered full tensors to rank 0's `send_weights`, the opposite of what
is needed here -- call `publish` from every rank where the sharded parameters are, after the optimizer step, instead
of handing gathered tensors to rank 0. The trainer Space does exactly that for TRL's AsyncGRPOTrainer when it is
started under torchrun (its own package documents how); tests/shared/sharded_worker.py is a plain FSDP2 loop on the
tiny Qwen3 under `torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.bucket import Bucket
from shared.digest import XSUM64, DigestBuilder, ElementSum, algorithm_of, combine
from shared.errors import (
    BucketFileNotFound,
    DwsError,
    ModelMismatchError,
    NonFiniteWeightsError,
    OwnerConflictError,
    PublishError,
)
from shared.formats import TensorChange, diff_state, encode_delta
from shared.lease import BucketLease
from shared.manifest import (
    LAYOUT_DIM0_CHUNKS,
    FileEntry,
    Manifest,
    ModelIdentity,
    PartEntry,
    TensorSpec,
    part_path,
    read_manifest,
    sha256_file,
    write_manifest,
)
from shared.parts import add_metadata, encode_anchor_part, part_metadata, rows_of
from shared.publisher import BackgroundPublishing

log = logging.getLogger("dws.sharded")

RECEIPTS_DIR = "receipts"


def receipt_path(version: int, index: int, count: int) -> str:
    return f"{RECEIPTS_DIR}/v{version:08d}.part{index:05d}-of-{count:05d}.json"


class StoredPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    changed: int | None = None


class PartReceipt(BaseModel):
    """What a rank stored for one version, read by rank 0 before it commits. `attempt` ties it to this run of the
    job: a receipt left by a crashed earlier run for the same version number is ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "dws-part-receipt"
    attempt: str
    version: int
    index: int
    count: int
    base: int | None = None
    delta: StoredPart | None = None
    anchor: StoredPart | None = None
    element_sum: str = ""  # xsum64 element sum of this rank's rows, hex
    total: int = 0  # elements in this rank's rows
    error: str | None = None


@dataclass(frozen=True)
class ShardReport:
    """What one publish did on this rank; on rank 0 it also says what was committed."""

    version: int
    rank: int
    base: int | None
    kinds: tuple[str, ...]  # committed kinds (rank 0); stored part kinds (other ranks)
    changed: int  # this rank's changed elements
    total: int  # this rank's elements
    part_bytes: int  # this rank's bytes uploaded
    snapshot_s: float
    encode_s: float
    digest_s: float
    upload_s: float
    wait_s: float  # rank 0: waiting for the other parts
    digest: str | None  # rank 0: the committed digest
    # Rank 0 only (None elsewhere): the committed version as a whole, summed over every rank's receipt.
    version_changed: int | None = None
    version_total: int | None = None
    delta_bytes: int | None = None  # all delta parts, when the delta is listed
    anchor_bytes: int | None = None  # all anchor parts, when the version is an anchor

    @property
    def sparsity(self) -> float:
        """Fraction of this rank's elements unchanged since the previous published version."""
        return 1.0 - self.changed / self.total if self.total else 1.0

    @property
    def bytes(self) -> int:
        """This rank's bytes uploaded for the version."""
        return self.part_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "sparsity": self.sparsity, "bytes": self.bytes}


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


class ShardedPublisher(BackgroundPublishing):
    """Publish the local shard of a sharded model as one part per rank. Every argument must be the same on every
    rank; `publish` and the constructor are collectives over `group` (default: a new gloo group over the world)."""

    # Another rank's failure reaches this one as a PublishError already naming the rank: raised as it is.
    _passthrough = (OwnerConflictError, PublishError)

    def __init__(
        self,
        bucket: Bucket | str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        group=None,
        model_name: str = "",
        anchor_every: int = 10,
        anchor_fraction: float = 0.5,
        keep_anchors: int = 2,
        encoding: str = "compact",
        queue_size: int = 2,
        token: str | None = None,
        run_id: str | None = None,
        take_over: bool = False,
        lease_ttl_s: float = 120.0,
        lease_settle_s: float = 0.5,
        commit_timeout_s: float = 600.0,
        poll_s: float = 0.2,
        spool_dir: str | Path | None = None,
        on_report: Callable[[ShardReport], None] | None = None,
    ):
        import torch.distributed as dist

        self._check_policy(anchor_every=anchor_every, anchor_fraction=anchor_fraction, keep_anchors=keep_anchors,
                           queue_size=queue_size)
        if commit_timeout_s <= 0 or poll_s <= 0:
            raise ValueError("commit_timeout_s and poll_s must be > 0")
        self._dist = dist if dist.is_available() and dist.is_initialized() else None
        if self._dist is not None:
            self.rank = dist.get_rank() if rank is None else rank
            self.world_size = dist.get_world_size() if world_size is None else world_size
            # A group of our own, on gloo: our few-byte collectives never queue behind the trainer's NCCL work.
            self._group = group if group is not None else dist.new_group(backend="gloo")
        else:
            if (rank or 0) != 0 or (world_size or 1) != 1:
                raise ValueError("ShardedPublisher with several ranks needs torch.distributed initialised")
            self.rank, self.world_size, self._group = 0, 1, None
        self._configure(bucket, token=token, model_name=model_name, anchor_every=anchor_every,
                        anchor_fraction=anchor_fraction, keep_anchors=keep_anchors, encoding=encoding,
                        on_report=on_report, run_id=run_id)
        self.commit_timeout_s = commit_timeout_s
        self.poll_s = poll_s
        self.owner = f"{self.run_id} ({socket.gethostname()}:{os.getpid()}, {self.world_size} ranks)"
        self.reports: list[ShardReport] = []
        self._spool = Path(spool_dir) if spool_dir else Path(tempfile.mkdtemp(prefix=f"dws-spool-r{self.rank}-"))
        self._spool.mkdir(parents=True, exist_ok=True)

        # Rank 0 alone owns the bucket (lease, manifest); the others learn the outcome, so that a refusal is one
        # clear error on every rank instead of a hang in the next collective.
        self._lease: BucketLease | None = None
        err, manifest_bytes, attempt = None, None, uuid.uuid4().hex
        if self.rank == 0:
            try:
                self._lease = BucketLease(self.bucket, run_id=self.run_id, ttl_s=lease_ttl_s, take_over=take_over,
                                          settle_s=lease_settle_s)
                self._lease.claim()
                m0 = read_manifest(self.bucket)
                manifest_bytes = m0.to_bytes() if m0 else None
            except DwsError as exc:
                err = (type(exc).__name__, str(exc))
        err, manifest_bytes, attempt = self._broadcast((err, manifest_bytes, attempt))
        if err is not None:
            if err[0] == "OwnerConflictError":  # the trainer tells this one apart (another live run owns the bucket)
                raise OwnerConflictError(err[1])
            raise PublishError(f"rank 0 could not start publishing to {self.bucket.address}: {err[0]}: {err[1]}")
        self.attempt = attempt
        self._manifest: Manifest | None = Manifest.from_bytes(manifest_bytes) if manifest_bytes else None
        self._shapes: dict[str, tuple[int, ...]] | None = self._manifest.model.shapes if self._manifest else None
        self._prev: dict[str, torch.Tensor] | None = None  # this rank's rows as last published, bf16
        self._esum: ElementSum | None = None
        self._prev_version: int | None = self._manifest.latest if self._manifest else None
        self._last_queued = self._prev_version
        if self._manifest is not None:
            self._restore()
        # Rank 0's anchor policy, decided at publish time and shared with every rank.
        self._since_anchor = 0
        self._failed: BaseException | None = None
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"dws-sharded-r{self.rank}", daemon=True)
        self._thread.start()
        log.info("rank %d/%d publishing to %s (%s)", self.rank, self.world_size, self.bucket.address,
                 f"continuing from v{self._prev_version}" if self._manifest else "empty bucket")

    # ------------------------------------------------------------------------------------------- collectives
    def _broadcast(self, obj):
        if self._dist is None:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def _gather(self, obj) -> list:
        if self._dist is None:
            return [obj]
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    # ------------------------------------------------------------------------------------------- restart
    def _restore(self) -> None:
        """Rebuild this rank's rows of the bucket's latest version, and prove (all ranks together) that they hash
        to its digest; otherwise every rank forgets them and the next version is an anchor."""
        m = self._manifest
        ok, why = True, ""
        try:
            state = self._rebuild_rows(m)
            builder = DigestBuilder()
            for name, t in state.items():
                shape = m.model.shapes[name]
                builder.update_rows(name, shape, rows_of(shape, self.rank, self.world_size)[0],
                                    t.reshape(1) if t.dim() == 0 else t)
            esum = builder.partial_sum
        except Exception as exc:  # noqa: BLE001 -- whatever it is, the other ranks must hear it, not hang
            ok, why, state, esum = False, f"rank {self.rank}: {type(exc).__name__}: {exc}", None, 0
        gathered = self._gather((ok, why, esum))
        if all(g[0] for g in gathered) and algorithm_of(m.latest_digest) == XSUM64:
            digest = combine(m.model.shapes, [g[2] for g in gathered])
            if digest == m.latest_digest:
                self._prev, self._esum = state, ElementSum(esum)
                log.info("rank %d: rebuilt its rows of v%d from the bucket (digest verified across %d ranks)",
                         self.rank, m.latest, self.world_size)
                return
            why = f"the rebuilt rows hash to {digest}, the manifest says {m.latest_digest}"
        else:
            why = "; ".join(g[1] for g in gathered if not g[0]) or "the latest digest is not partition-independent"
        if self.rank == 0:
            log.warning("cannot continue v%d's history shard by shard (%s); the next version is an anchor",
                        m.latest, why)

    def _rebuild_rows(self, m: Manifest) -> dict[str, torch.Tensor]:
        """This rank's rows at m.latest: the newest anchor and the deltas after it. A version stored in this world
        size's parts is read from this rank's part only; any other partition -- another rank count, or one file
        written by a single process -- is re-split: this rank reads only the files that overlap its rows (a
        single-process file is one file: read once, whole, then dropped) and keeps only its own rows."""
        from shared.follower import Follower, apply_to_state, plan_sync

        steps = plan_sync(m, None).steps
        follower = Follower(self.bucket, cache_dir=self._spool / "restore", download_workers=1)
        shapes = m.model.shapes
        state: dict[str, torch.Tensor] = {}
        resplit = 0
        for e in steps:
            if e.base is None:
                state = {}
            if len(e.parts) == self.world_size and e.layout == LAYOUT_DIM0_CHUNKS:
                from shared.parts import read_part

                path, size, sha = e.files[self.rank]
                vf = follower._fetch_one(e, path, size, sha, self.rank, m)
                pf, _ = read_part(vf.path, shapes=shapes, index=self.rank, count=self.world_size,
                                  version=e.version, base=e.base)
                if pf.kind == "anchor":
                    state.update(pf.tensors)  # fresh tensors read from the file: taken as they are, not copied again
                else:
                    apply_to_state(state, pf)  # a part's tensors are this rank's rows: local coordinates throughout
                vf.path.unlink(missing_ok=True)
                del pf
            else:
                resplit += 1
                self._apply_resplit(state, e, m, follower)
        if resplit:
            log.info("rank %d: re-split %d stored version(s) into this rank's rows of %d", self.rank, resplit,
                     self.world_size)
        return state

    def _apply_resplit(self, state: dict[str, torch.Tensor], e: FileEntry, m: Manifest, follower) -> None:
        """Apply one stored version written in another partition to this rank's rows (local coordinates)."""
        from shared.formats import bits
        from shared.parts import read_part

        shapes = m.model.shapes
        if any(len(s) == 0 for s in shapes.values()):
            raise PublishError("a 0-d tensor cannot be re-split by rows")
        count = len(e.parts) or 1
        mine = {n: rows_of(s, self.rank, self.world_size) for n, s in shapes.items()}
        for i, (path, size, sha) in enumerate(e.files):
            theirs = {n: rows_of(s, i, count) if e.parts else (0, s[0]) for n, s in shapes.items()}
            if not any(max(a0, r0) < min(a1, r1) for n, (a0, a1) in theirs.items() for r0, r1 in (mine[n],)):
                continue  # none of this file's rows are this rank's: not even downloaded
            vf = follower._fetch_one(e, path, size, sha, i if e.parts else None, m)
            if e.parts:
                pf, _ = read_part(vf.path, shapes=shapes, index=i, count=count, version=e.version, base=e.base)
            else:
                pf = follower.decode(vf, manifest=m)
            for name, t in pf.tensors.items():
                (a0, a1), (r0, r1) = theirs[name], mine[name]
                row = 1
                for d in shapes[name][1:]:
                    row *= d
                if pf.kind == "anchor":
                    if name not in state:
                        state[name] = torch.empty((r1 - r0, *shapes[name][1:]), dtype=torch.bfloat16)
                    o0, o1 = max(a0, r0), min(a1, r1)
                    if o0 < o1:
                        state[name][o0 - r0:o1 - r0] = t[o0 - a0:o1 - a0]
                    continue
                if t.needs_base_context:
                    raise PublishError(f"v{e.version} is coded against its whole base ({pf.encoding}): it cannot "
                                       "be re-split into other rows")
                g = t.positions + a0 * row  # flat index in the full tensor
                keep = (g >= r0 * row) & (g < r1 * row)
                if not keep.any():
                    continue
                local = g[keep] - r0 * row
                flat = bits(state[name]).reshape(-1)
                if t.values is not None:
                    flat[local] = t.values[keep]
                else:  # residuals against the base: the base values at these positions are this rank's
                    flat[local] = (flat[local].view(np.uint16) + t.residual[keep].view(np.uint16)).astype(np.uint16)
            vf.path.unlink(missing_ok=True)
            del pf

    def restored_rows(self) -> dict[str, torch.Tensor] | None:
        """This rank's rows (bf16) of the bucket's latest version when the restart rebuilt them, else None: a trainer
        without its own checkpoint may load them into its local shards to continue exactly where the bucket is."""
        return None if self._prev is None else {k: v.clone() for k, v in self._prev.items()}

    # ------------------------------------------------------------------------------------------- public API
    @property
    def latest_version(self) -> int | None:
        return self._manifest.latest if self._manifest else None

    def local_rows(self, named_tensors) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
        """name -> (full shape, this rank's rows as a CPU bf16 copy) for DTensor (Shard(0) on a 1-D mesh) or plain
        tensors. Nothing is gathered: a plain tensor is sliced locally."""
        from torch.distributed.tensor import Shard

        out = {}
        items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        for name, t in items:
            shape = tuple(int(s) for s in t.shape)
            r0, r1 = rows_of(shape, self.rank, self.world_size)
            if _is_dtensor(t):
                mesh = t.device_mesh
                if mesh.ndim != 1 or tuple(t.placements) not in ((Shard(0),),):
                    raise ValueError(f"{name}: placements {tuple(t.placements)} on a {mesh.ndim}-D mesh; only "
                                     "Shard(0) on a 1-D mesh (FSDP2's fully_shard) can be published by rows")
                if mesh.size() != self.world_size or mesh.get_local_rank() != self.rank:
                    raise ValueError(f"{name}: mesh of {mesh.size()} (this rank at {mesh.get_local_rank()}) is not "
                                     f"the publishing group of {self.world_size} (rank {self.rank})")
                local = t.to_local()
                if tuple(local.shape) != ((r1 - r0, *shape[1:]) if shape else ()):
                    raise ValueError(f"{name}: local shard is {tuple(local.shape)}, rows [{r0}, {r1}) of {shape} "
                                     "were expected (uneven sharding is not the dim0-chunks layout)")
            else:
                local = t[r0:r1] if shape else t
            # copy=True: a CPU bf16 shard would otherwise be aliased and keep changing under us.
            out[name] = (shape, local.detach().to(device="cpu", dtype=torch.bfloat16, copy=True).contiguous())
        return out

    def publish(self, named_tensors, version: int) -> Future:
        """Collective: every rank calls it with its own parameters and the same version. Snapshots this rank's
        rows (the only blocking work), checks NaN/Inf on every rank, and queues the part for upload. Returns a
        Future of this rank's ShardReport."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"version must be a non-negative integer, got {version!r}")
        if self._last_queued is not None and version <= self._last_queued:
            raise ValueError(f"version {version} is not newer than v{self._last_queued} already published")
        t0 = time.perf_counter()
        try:
            local = self.local_rows(named_tensors)
            refused = None if local else "nothing to publish: no tensors given"
        except Exception as exc:  # noqa: BLE001 -- one rank's bad input must stop every rank, not hang them
            local, refused = {}, f"{type(exc).__name__}: {exc}"
        bad = [n for n, (_, t) in local.items() if not bool(torch.isfinite(t).all())]
        with self._lock:
            pending = self._failed or (self._errors[0] if self._errors else None)
        anchor = False
        if self.rank == 0:
            anchor = self._prev is None or self._since_anchor + 1 >= self.anchor_every or self._over_fraction()
        mine = {"bad": bad[:3], "nbad": len(bad), "error": f"{type(pending).__name__}: {pending}" if pending else None,
                "refused": refused,
                "anchor": anchor, "version": version,
                "shapes": sorted((n, s) for n, (s, _) in local.items()) if self._shapes is None else None}
        gathered = self._gather(mine)
        failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"]]
        if failed:
            raise PublishError(f"publishing stopped: rank {failed[0][0]} failed earlier ({failed[0][1]}); the "
                               f"bucket keeps its last committed version; restart the run to continue from it")
        refusals = [(r, g["refused"]) for r, g in enumerate(gathered) if g["refused"]]
        if refusals:
            raise ValueError(f"cannot publish v{version}: rank {refusals[0][0]}: {refusals[0][1]}")
        if any(g["version"] != version for g in gathered):
            raise ValueError(f"ranks disagree on the version: {[g['version'] for g in gathered]}")
        nonfinite = [(r, g) for r, g in enumerate(gathered) if g["nbad"]]
        if nonfinite:
            r, g = nonfinite[0]
            raise NonFiniteWeightsError(
                f"refusing to publish v{version}: rank {r} has {g['nbad']} tensor(s) holding NaN or Inf after the "
                f"bf16 cast (first: {', '.join(g['bad'])}); no rank wrote anything")
        self._check_identity(local, gathered)
        anchor = bool(gathered[0]["anchor"])
        if self.rank == 0:
            self._since_anchor = 0 if anchor else self._since_anchor + 1
        fut: Future = Future()
        self._last_queued = version
        self._queue.put((version, local, anchor, time.perf_counter() - t0, fut))
        return fut

    # ------------------------------------------------------------------------------------------- internals
    def _who(self) -> str:
        return f"rank {self.rank}"

    def _over_fraction(self) -> bool:
        m = self._manifest
        if m is None or not m.anchors:
            return True
        last = m.anchors[-1]
        since = sum(d.bytes for d in m.deltas if d.version > last.version)
        return since > self.anchor_fraction * last.bytes

    def _check_identity(self, local, gathered) -> None:
        mine = {n: s for n, (s, _) in local.items()}
        if self._shapes is None:
            others = [dict((n, tuple(s)) for n, s in g["shapes"]) for g in gathered]
            if any(o != mine for o in others):
                raise ModelMismatchError("ranks publish different tensor names or shapes")
            self._shapes = mine
            return
        if mine != self._shapes:
            missing = sorted(set(self._shapes) - set(mine))[:3]
            extra = sorted(set(mine) - set(self._shapes))[:3]
            reshaped = sorted(k for k in set(mine) & set(self._shapes) if mine[k] != self._shapes[k])[:3]
            raise ModelMismatchError(
                f"weights do not match the model in bucket {self.bucket.address} (missing {missing}, unexpected "
                f"{extra}, reshaped {reshaped}); use another bucket or prefix")

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            version, local, anchor, snapshot_s, fut = job
            try:
                with self._lock:
                    if self._failed is not None:
                        raise self._failed  # a version after a failed one would name an uncommitted base
                report = self._publish_now(version, local, anchor, snapshot_s)
                self.reports.append(report)
                fut.set_result(report)
                if self.on_report:
                    self.on_report(report)
            except BaseException as exc:  # noqa: BLE001 -- surfaced through flush()/publish() on every rank
                log.error("rank %d: publishing v%d failed: %s", self.rank, version, exc)
                with self._lock:
                    self._errors.append(exc)
                    self._failed = self._failed or exc
                fut.set_exception(exc)
            finally:
                self._queue.task_done()

    def _upload(self, blob_or_none: bytes | None, local_file: Path | None, dest: str) -> StoredPart:
        if blob_or_none is not None:
            local_file = self._spool / dest.replace("/", "-")
            local_file.write_bytes(blob_or_none)
        if self._lease is not None:
            self._lease.check(f"uploading {dest}")
        stored = StoredPart(bytes=local_file.stat().st_size, sha256=sha256_file(local_file))
        self.bucket.upload(local_file, dest)
        local_file.unlink(missing_ok=True)
        return stored

    def _publish_now(self, version: int, local, anchor: bool, snapshot_s: float) -> ShardReport:
        shapes = {n: s for n, (s, _) in local.items()}
        snap = {n: t for n, (_, t) in local.items()}
        n, k = self.world_size, self.rank
        total = sum(t.numel() for t in snap.values())
        receipt = dict(attempt=self.attempt, version=version, index=k, count=n, total=total)
        try:
            t0 = time.perf_counter()
            changes: dict[str, TensorChange] = {}
            delta_blob = None
            changed = total
            if self._prev is not None:
                # The codec's detection, as the single-process publisher does it: one parallel read of both rows
                # (positions local to this rank's rows), plus what the encoding needs from the base.
                changes = diff_state(snap, {name: self._prev[name] for name in snap}, encoding=self.encoding)
                changed = sum(int(ch.positions.size) for ch in changes.values())
                # Positions are local to this rank's rows; the header says where the rows sit in the full tensor.
                delta_blob = add_metadata(
                    encode_delta(changes, version=version, base=self._prev_version, total=total,
                                 encoding=self.encoding),
                    part_metadata(shapes, k, n))
            anchor_blob = encode_anchor_part(snap, version=version, shapes=shapes, index=k, count=n) \
                if anchor or delta_blob is None else None
            encode_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            if self._esum is not None and self._prev is not None:
                esum = ElementSum(self._esum.value)
                for name, ch in changes.items():
                    r0 = rows_of(shapes[name], k, n)[0]
                    row = 1
                    for s in shapes[name][1:]:
                        row *= s
                    # Terms are keyed by the element's index in the *full* tensor: shift the local positions.
                    esum.replace(name, shapes[name], ch.positions + r0 * row, ch.base_bits, ch.new_bits)
            else:
                builder = DigestBuilder()
                for name, t in snap.items():
                    builder.update_rows(name, shapes[name], rows_of(shapes[name], k, n)[0],
                                        t.reshape(1) if t.dim() == 0 else t)
                esum = ElementSum(builder.partial_sum)
            digest_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            part_bytes = 0
            if delta_blob is not None:
                stored = self._upload(delta_blob, None, part_path(version, k, n, anchor=False))
                receipt["delta"] = StoredPart(bytes=stored.bytes, sha256=stored.sha256, changed=changed)
                receipt["base"] = self._prev_version
                part_bytes += stored.bytes
            if anchor_blob is not None:
                receipt["anchor"] = self._upload(anchor_blob, None, part_path(version, k, n, anchor=True))
                part_bytes += receipt["anchor"].bytes
            del delta_blob, anchor_blob
            receipt["element_sum"] = f"{esum.value:016x}"
            self.bucket.write_bytes(receipt_path(version, k, n), PartReceipt(**receipt).model_dump_json().encode())
            upload_s = time.perf_counter() - t0
        except BaseException as exc:
            # Tell rank 0 at once rather than let it wait out its timeout.
            try:
                self.bucket.write_bytes(receipt_path(version, k, n), PartReceipt(
                    attempt=self.attempt, version=version, index=k, count=n,
                    error=f"{type(exc).__name__}: {exc}"[:2000]).model_dump_json().encode())
            except Exception:  # noqa: BLE001 -- the missing receipt then says it, after the timeout
                pass
            raise
        base = self._prev_version if "delta" in receipt else None
        self._prev, self._prev_version, self._esum = snap, version, esum
        kinds = tuple(x for x in ("delta", "anchor") if x in receipt)
        wait_s, digest, whole = 0.0, None, {}
        if k == 0:
            t0 = time.perf_counter()
            kinds, digest, whole = self._commit(version, shapes)
            wait_s = time.perf_counter() - t0
        log.info("rank %d: v%d part %d/%d %s, %d/%d changed, %s B, encode %.3fs upload %.3fs%s", k, version, k, n,
                 "+".join(kinds), changed, total, f"{part_bytes:,}", encode_s, upload_s,
                 f", committed after {wait_s:.3f}s" if k == 0 else "")
        return ShardReport(version=version, rank=k, base=base, kinds=kinds, changed=changed, total=total,
                           part_bytes=part_bytes, snapshot_s=snapshot_s, encode_s=encode_s, digest_s=digest_s,
                           upload_s=upload_s, wait_s=wait_s, digest=digest, **whole)

    def _await_receipts(self, version: int) -> list[PartReceipt]:
        """Rank 0: every rank's receipt for this version, polled from the bucket (bounded by commit_timeout_s)."""
        n = self.world_size
        got: dict[int, PartReceipt] = {}
        deadline = time.monotonic() + self.commit_timeout_s
        while True:
            # One listing per poll, then a read per new receipt only: at hundreds of ranks, reading every missing
            # receipt each poll would be hundreds of requests a second against the bucket.
            listed = {e.path for e in self.bucket.list(RECEIPTS_DIR)}
            for k in range(n):
                if k in got or receipt_path(version, k, n) not in listed:
                    continue
                try:
                    rec = PartReceipt.model_validate_json(self.bucket.read_bytes(receipt_path(version, k, n)))
                except BucketFileNotFound:
                    continue
                except ValidationError:
                    continue  # a torn or foreign receipt: wait for a good one
                if rec.attempt != self.attempt or rec.version != version or rec.index != k or rec.count != n:
                    continue  # left by an earlier run of this job
                if rec.error:
                    raise PublishError(f"v{version} not committed: rank {k} failed storing its part ({rec.error}); "
                                       "the bucket keeps its last committed version")
                got[k] = rec
            if len(got) == n:
                return [got[k] for k in range(n)]
            if time.monotonic() > deadline:
                missing = sorted(set(range(n)) - set(got))
                raise PublishError(
                    f"v{version} not committed: part(s) {missing} of {n} were not stored within "
                    f"{self.commit_timeout_s:.0f} s (did rank(s) {missing} die?); the bucket keeps its last "
                    "committed version, and a restarted run continues from it")
            time.sleep(self.poll_s)

    def _commit(self, version: int, shapes: dict[str, tuple[int, ...]]) -> tuple[tuple[str, ...], str, dict]:
        receipts = self._await_receipts(version)
        n = self.world_size
        digest = combine(shapes, [int(r.element_sum, 16) for r in receipts])
        new: list[FileEntry] = []
        kinds: list[str] = []
        bases = {r.base for r in receipts}
        anchor_bytes = sum(r.anchor.bytes for r in receipts) if all(r.anchor for r in receipts) else None
        m = self._manifest
        if all(r.delta for r in receipts) and len(bases) == 1 and m is not None and bases == {m.latest}:
            delta_bytes = sum(r.delta.bytes for r in receipts)
            # At an anchor version a small delta is still worth storing: up-to-date replicas fetch it instead.
            if anchor_bytes is None or delta_bytes < anchor_bytes:
                new.append(FileEntry(
                    version=version, bytes=delta_bytes, digest=digest, base=m.latest,
                    changed=sum(r.delta.changed or 0 for r in receipts), encoding=self.encoding,
                    layout=LAYOUT_DIM0_CHUNKS,
                    parts=tuple(PartEntry(index=r.index, path=part_path(version, r.index, n, anchor=False),
                                          bytes=r.delta.bytes, sha256=r.delta.sha256, changed=r.delta.changed)
                                for r in receipts)))
                kinds.append("delta")
        if anchor_bytes is not None:
            new.append(FileEntry(
                version=version, bytes=anchor_bytes, digest=digest, layout=LAYOUT_DIM0_CHUNKS,
                parts=tuple(PartEntry(index=r.index, path=part_path(version, r.index, n, anchor=True),
                                      bytes=r.anchor.bytes, sha256=r.anchor.sha256) for r in receipts)))
            kinds.append("anchor")
        if not new:
            raise PublishError(f"v{version} not committed: its parts are neither a delta on v"
                               f"{m.latest if m else None} nor an anchor")
        anchors = list(m.anchors) if m else []
        deltas = list(m.deltas) if m else []
        for e in new:
            (anchors if e.base is None else deltas).append(e)
        anchors = anchors[-self.keep_anchors:]
        deltas = [d for d in deltas if d.version > anchors[0].version]
        identity = m.model if m else ModelIdentity(
            name=self.model_name, tensors={k: TensorSpec(shape=s) for k, s in sorted(shapes.items())})
        manifest = Manifest(model=identity, latest=version, latest_digest=digest, digest=XSUM64,
                            anchors=tuple(anchors), deltas=tuple(deltas), owner=self.owner)
        self._lease.check(f"committing v{version}")
        write_manifest(self.bucket, manifest)
        dropped = sorted((m.paths if m else set()) - manifest.paths)
        self._manifest = manifest
        # Retention (rule 6) only now that no stored manifest names them; receipts are never read again. A failure
        # here leaves garbage only.
        unlisted = []
        if "delta" not in kinds and all(r.delta for r in receipts):
            # Stored, but larger than the anchor of the same version: never listed, so garbage now.
            unlisted = [part_path(version, k, n, anchor=False) for k in range(n)]
        try:
            self.bucket.delete([*dropped, *unlisted, *(receipt_path(version, k, n) for k in range(n))])
        except Exception as exc:  # noqa: BLE001
            log.warning("could not delete retired files %s: %s", dropped, exc)
        whole = dict(version_total=sum(r.total for r in receipts),
                     version_changed=sum(r.delta.changed or 0 for r in receipts) if all(r.delta for r in receipts)
                     else sum(r.total for r in receipts),
                     delta_bytes=sum(r.delta.bytes for r in receipts) if "delta" in kinds else None,
                     anchor_bytes=anchor_bytes if "anchor" in kinds else None)
        return tuple(kinds), digest, whole


__all__ = ["PartReceipt", "ShardReport", "ShardedPublisher", "receipt_path"]
