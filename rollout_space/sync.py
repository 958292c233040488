"""The replica's sync loop: keep the served weights on the bucket's latest version (DESIGN.md §3 rules 4-5, §4).

Owns the order of a sync and what the replica claims. A version is an ordered list of verified files; each round:

1. read the manifest (cheap etag check) and plan the shortest verified path from the served version;
2. download every file and check its sha256 (shared/follower.py), then, file by file, decode and validate it
   against the model identity and write it as a *prepared* file (rollout_space/prepared.py): the form the worker
   writes directly -- all while vLLM keeps serving; a delta is decoded and written tensor by tensor, slice by
   slice, so the gateway's memory is bounded by one tensor's encoded bytes and one slice;
3. every file of the first version is turned by the worker into its *plan* (``dws_prepare``, in budgeted RPCs that
   vLLM runs between engine steps): every position and value checked, base-context tensors decoded and residuals
   resolved against the served weights, storage offsets computed -- still before the pause;
4. pause vLLM (requests held, not dropped), one ``dws_apply`` RPC writes every file in place and reads the written
   positions back (O(changed); with a plan that is all the pause does), resume;
5. after resume, the full served-weights digest runs in chunks between engine steps; its result decides whether
   the replica claims the version (``verified_versions``, ``digest_match``). On a mismatch the replica stops
   claiming any version (``served_version`` null), says so in ``last_sync.error`` and resyncs from the newest
   anchor. The time from resume to that verdict is the window in which a wrong weight could be served
   (``verify_window_s``, reported per sync and on /status).

On any failure before the pause the last good version keeps being served.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import DwsError, FormatError
from shared.follower import Follower, SyncPlan, validate_patch
from shared.formats import DeltaReader
from shared.manifest import Manifest
from shared.wire import SyncRecord

from rollout_space.prepared import write_prepared, write_stream
from rollout_space.vllm_proc import VllmControl, VllmError

log = logging.getLogger("dws.rollout.sync")

VERIFY_MODES = ("every", "anchors")
DIGEST_CHUNK_BYTES = 64 << 20  # weights hashed per RPC after resume: bounds how long one engine step waits
PREPARE_BUDGET = 1 << 20  # changed elements the worker prepares per RPC before the pause: same reason (~50-200 ms)


@dataclass
class SyncState:
    served_version: int | None = None
    served_digest: str | None = None
    digest_match: bool | None = None
    latest_version: int | None = None
    latest_digest: str | None = None
    syncs: int = 0
    failures: int = 0
    resyncs_from_anchor: int = 0
    digest_mismatches: int = 0
    last: SyncRecord | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=50))
    versions_served: list[int] = field(default_factory=list)  # every version this replica has served, in order
    # version -> digest this replica measured over the weights it served at that version (after resume, every
    # weight hashed on the replica, never taken from the manifest). An end-to-end check compares these with the
    # trainer's own digests.
    verified: dict[int, str] = field(default_factory=dict)


VERIFIED_ON_STATUS = 512


def _summary(values) -> dict:
    vals = sorted(values)
    if not vals:
        return {"count": 0, "median": None, "max": None}
    return {"count": len(vals), "median": round(statistics.median(vals), 1), "max": round(vals[-1], 1)}


def _pause_summary(history) -> dict:
    """Median / max pause of the recent successful syncs that paused vLLM (a sync rejected before the pause has
    pause 0 and would drag the median down)."""
    return _summary(r.pause_s * 1e3 for r in history if r.ok and r.pause_s > 0)


def check_anchor(path: Path, entry, shapes: dict | None) -> None:
    """An anchor's header and values, streamed one tensor at a time (an anchor is model-sized: never decoded whole
    here): names and shapes of the model identity, bf16, finite, the version the manifest says."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stated = meta.get("version", meta.get("model_version"))
            if shapes is not None and stated is not None and str(stated) != str(entry.version):
                raise FormatError(f"{entry.path}: file says v{stated}, manifest says v{entry.version}")
            keys = sorted(f.keys())
            if shapes is not None:
                missing, extra = sorted(set(shapes) - set(keys)), sorted(set(keys) - set(shapes))
                if missing or extra:
                    raise FormatError(f"{entry.path}: anchor lacks {missing[:3]} / has unknown {extra[:3]}")
            for name in keys:
                sl = f.get_slice(name)
                if sl.get_dtype() != "BF16":
                    raise FormatError(f"{entry.path}: {name} is {sl.get_dtype()}, anchors are BF16")
                if shapes is not None and tuple(sl.get_shape()) != tuple(shapes[name]):
                    raise FormatError(f"{entry.path}: {name} has shape {sl.get_shape()}, the model has "
                                      f"{tuple(shapes[name])}")
                bits = f.get_tensor(name).view(torch.int16)
                if bool(((bits.to(torch.int32) & 0x7F80) == 0x7F80).any()):
                    raise FormatError(f"{entry.path}: {name} contains NaN or Inf")
    except SafetensorError as exc:
        raise FormatError(f"{entry.path}: unreadable safetensors file ({exc})") from None


def warm_decoders() -> None:
    """Encode and decode a tiny delta with every encoding once, when the replica starts (while vLLM loads): the
    decoders' one-time costs -- compiled kernels and the libraries behind them load on first use, ~100 MB resident
    -- land in the replica's baseline instead of in its first sync (its latency and its memory rise)."""
    import tempfile

    import numpy as np

    from shared.codec import ENCODINGS
    from shared.formats import TensorChange, encode_delta

    base = (np.arange(4096, dtype=np.uint16) % 64) + 0x3C00
    new = base.copy()
    new[::7] += 1
    pos = np.flatnonzero(base != new).astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="dws-warm-") as tmp:
        for name in sorted(ENCODINGS):
            try:
                blob = encode_delta({"w": TensorChange((4096,), pos, new[pos], base[pos], base=base)}, version=1,
                                    base=0, total=4096, encoding=name)
                path = Path(tmp) / f"{name}.safetensors"
                path.write_bytes(blob)
                with DeltaReader(path) as r:
                    for _, t in r:
                        if getattr(t, "needs_base_context", False):
                            t.decode(base)
            except Exception as exc:  # noqa: BLE001 -- a warm-up only: the real decode reports real errors
                log.debug("warming the %s decoder: %s", name, exc)


class Syncer:
    def __init__(self, follower: Follower, control: VllmControl, *, verify: str = "every",
                 poll_interval: float = 3.0, digest_chunk_bytes: int = DIGEST_CHUNK_BYTES,
                 prepare_budget: int = PREPARE_BUDGET):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}")
        self.follower = follower
        self.control = control
        self.verify = verify
        self.poll_interval = poll_interval
        self.digest_chunk_bytes = digest_chunk_bytes
        self.prepare_budget = prepare_budget
        self.state = SyncState()
        self.paused = False
        self.syncing = False
        self.verifying = False
        self._nudge = asyncio.Event()
        self._lock = asyncio.Lock()
        self._avoid_deltas = False  # set after a failed delta path: next round goes through an anchor
        self.version_changed = asyncio.Condition()

    # ------------------------------------------------------------------------------------------------ driving
    def nudge(self) -> None:
        """Check the manifest now (the authenticated POST /sync)."""
        self._nudge.set()

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the loop must survive anything and say why
                log.exception("sync round failed unexpectedly: %s", exc)
            try:
                await asyncio.wait_for(self._nudge.wait(), timeout=self.poll_interval)
            except asyncio.TimeoutError:
                pass
            self._nudge.clear()

    async def identify(self) -> None:
        """After (re)start: which kept version, if any, is vLLM serving? Saves downloading an anchor when the base
        model already is one of the bucket's versions (typically v0)."""
        try:
            digest, _ = await self.control.digest_chunked(self.digest_chunk_bytes)
            m = await asyncio.to_thread(self.follower.manifest)
        except (VllmError, DwsError) as exc:
            log.warning("could not identify the served weights: %s", exc)
            return
        self.state.served_digest = digest
        found = None
        for e in (*m.anchors, *m.deltas) if m is not None else ():
            if e.digest == digest:
                found = e.version
        try:
            await self.control.declare(found)
        except VllmError as exc:
            log.warning("could not declare the served version to vLLM: %s", exc)
            return
        if found is None:
            log.info("served weights are not a kept bucket version; will start from an anchor")
            return
        self.state.served_version = found
        self.state.digest_match = True
        self.state.verified[found] = digest
        log.info("served weights are bucket version v%d (digest match)", found)

    def forget_version(self) -> None:
        """vLLM restarted or lost consistency: claim nothing until resynced."""
        self.state.served_version = None
        self.state.digest_match = None

    # ------------------------------------------------------------------------------------------------ one round
    async def sync_once(self) -> SyncRecord | None:
        async with self._lock:
            try:
                return await self._sync_once()
            finally:
                self.syncing = False

    async def _sync_once(self) -> SyncRecord | None:
        st = self.state
        try:
            m: Manifest | None = await asyncio.to_thread(self.follower.manifest)
            if m is None:
                return None
            st.latest_version, st.latest_digest = m.latest, m.latest_digest
            if st.served_version == m.latest:
                return None
            current = None if self._avoid_deltas else st.served_version
            plan: SyncPlan = self.follower.plan(current, manifest=m)
        except (DwsError, OSError) as exc:
            return self._no_plan(exc)
        # Until this round is fully recorded (digest measured, last_sync written), /status says so: a poller
        # must not pair the new served_version with the previous round's record.
        self.syncing = True
        rec = SyncRecord(started=time.time(), plan=plan.describe(), from_version=st.served_version,
                         to_version=plan.target, bytes=plan.bytes)
        prepared_dir = self.follower.cache_dir / "prepared"
        try:
            t0 = time.perf_counter()
            files = await asyncio.to_thread(self.follower.fetch, plan)
            # Decode and validate before the pause, file by file: a hostile or broken delta never gets near the
            # weights, and the worker receives the decoded form so the pause only writes.
            t1 = time.perf_counter()
            steps = []
            for i, vf in enumerate(files):
                steps.append(await asyncio.to_thread(self._prepare_file, vf, m, prepared_dir / f"{i:03d}.safetensors",
                                                     rec))
            rec.decode_s = time.perf_counter() - t1
            # The worker turns every file of the first version into its plan between engine steps, in budgeted
            # RPCs (no engine step waits long): positions checked, base-context tensors decoded and residuals
            # resolved against the served base, storage offsets computed -- so the pause only writes. Later versions'
            # bases exist only inside the pause, where the worker does that work itself.
            t2 = time.perf_counter()
            for s in steps:
                if s["kind"] != "delta" or s["version"] != steps[0]["version"]:
                    break
                await self._prepare_in_worker(s["path"])
            rec.prepare_s = time.perf_counter() - t2
            rec.download_s = time.perf_counter() - t0
            await self._apply(steps, plan, rec, m)
            rec.ok = True
            st.syncs += 1
            self._avoid_deltas = False
        except (DwsError, VllmError, OSError) as exc:
            rec.error = f"{type(exc).__name__}: {exc}"
            st.failures += 1
            if not plan.from_anchor:
                self._avoid_deltas = True
                st.resyncs_from_anchor += 1
            log.error("sync %s failed: %s (still serving v%s)", plan.describe(), rec.error, st.served_version)
        finally:
            st.last = rec
            st.history.append(rec)
            keep = {s.path for s in plan.steps}
            await asyncio.to_thread(self.follower.prune_cache, keep if not rec.ok else set())
            for p in prepared_dir.glob("*"):  # prepared files and the workers' plans beside them
                p.unlink(missing_ok=True)
        if rec.ok and rec.verified is False:
            self.nudge()  # resync from the anchor now, not at the next poll
        return rec

    def _prepare_file(self, vf, m: Manifest, dest: Path, rec: SyncRecord) -> dict:
        """One verified file -> one step of dws_apply (decoded + validated here; memory bounded by this file)."""
        e = vf.entry
        part = getattr(vf, "part", None)  # a version in parts (shared/parts.py): this file holds row slices
        rows = {n: list(r) for n, r in (vf.slices or {}).items()} if part is not None else None
        if e.base is None:
            if rows is None:
                check_anchor(vf.path, e, m.model.shapes if m.model else None)
            else:  # names, shapes and slices were checked by fetch(); values still must be finite
                check_anchor(vf.path, e, None)
            return {"path": str(vf.path), "kind": "anchor", "version": e.version, "base": None, "verify": False,
                    "check_values": False, "rows": rows}
        if part is not None:  # a part is a slice of the version: decoded whole (bounded by the part)
            pf = self.follower.decode(vf, manifest=m)
            summary = write_prepared(pf, dest, source=vf.path.name, rows=rows, full_shapes=m.model.shapes)
            del pf
        else:
            summary = self._stream_delta(vf, m, dest)
        rec.changed += summary["changed"]
        return {"path": str(dest), "kind": "delta", "version": e.version, "base": e.base, "verify": False}

    @staticmethod
    def _stream_delta(vf, m: Manifest, dest: Path) -> dict:
        """Decode into the prepared file tensor by tensor, slice by slice (`write_stream` reads the DeltaReader
        through `streamed()`): the gateway's memory is bounded by one tensor's encoded bytes and one decoded slice,
        not by the file. The header is checked against the manifest entry and model identity first."""
        shapes = m.model.shapes if m.model else None
        with DeltaReader(vf.path, shapes=shapes, base=vf.entry.base) as r:
            validate_patch(r.header, vf.entry, shapes)
            return write_stream(r, dest, version=r.header.version, base=r.header.base, shapes=r.header.shapes,
                                source=vf.path.name, params_chars=len(r.header.metadata.get("tensors", "")))

    async def _prepare_in_worker(self, path: str) -> None:
        while True:
            results = await self.control.rpc("dws_prepare", path, str(self.prepare_budget))
            first = results[0] if results else {}
            if not isinstance(first, dict):
                raise VllmError(f"dws_prepare answered {first!r}")
            if first.get("done"):
                return

    def _no_plan(self, exc: BaseException) -> SyncRecord:
        """The bucket is unreachable, or its manifest is hostile, broken or leads nowhere: nothing was fetched or
        applied and the last good version keeps being served -- but /status must say why, not only the log."""
        st = self.state
        rec = SyncRecord(started=time.time(), plan="read the manifest", from_version=st.served_version,
                         to_version=None, error=f"{type(exc).__name__}: {exc}")
        st.failures += 1
        repeated = st.last is not None and st.last.error == rec.error
        st.last = rec
        if not repeated:  # a long outage polled every few seconds must not flush the useful history
            st.history.append(rec)
        (log.debug if repeated else log.error)("cannot sync from the bucket: %s (still serving v%s)", rec.error,
                                               st.served_version)
        return rec

    async def _apply(self, steps: list[dict], plan: SyncPlan, rec: SyncRecord, m: Manifest) -> None:
        st = self.state
        before = st.served_version
        t_pause = time.perf_counter()
        await self.control.pause()
        self.paused = True
        try:
            t_apply = time.perf_counter()
            try:
                result = await self.control.apply(steps)
            except VllmError:
                await self._after_failed_apply(before)
                raise
            rec.apply_s = time.perf_counter() - t_apply
            rec.worker_apply_s = (result.get("ms") or 0.0) / 1e3
        finally:
            try:
                await self.control.resume()
            finally:
                self.paused = False
                rec.pause_s = time.perf_counter() - t_pause
                rec.control_s = max(0.0, rec.pause_s - rec.worker_apply_s)
        t_resumed = time.perf_counter()
        # Serving the new version now (every written position was read back inside the pause); claimed as verified
        # only once the full digest below agrees.
        st.served_version = plan.target
        st.served_digest, st.digest_match = None, None
        st.versions_served.append(plan.target)
        async with self.version_changed:
            self.version_changed.notify_all()
        if self.verify == "every" or plan.from_anchor:
            await self._verify(plan, rec, m, t_resumed)
        log.info("now serving v%d (%s; before pause %.3fs, pause %.1f ms, apply %.1f ms, verified %s)", plan.target,
                 plan.describe(), rec.download_s, rec.pause_s * 1e3, rec.apply_s * 1e3, rec.verified)

    async def _verify(self, plan: SyncPlan, rec: SyncRecord, m: Manifest, t_resumed: float) -> None:
        st = self.state
        want = m.digest_of(plan.target)
        self.verifying = True
        try:
            digest, worker_ms = await self.control.digest_chunked(self.digest_chunk_bytes)
        except VllmError as exc:
            log.warning("could not read the served digest: %s", exc)
            digest, worker_ms = None, None
        finally:
            self.verifying = False
        rec.verify_s = None if worker_ms is None else worker_ms / 1e3
        rec.verify_window_s = time.perf_counter() - t_resumed
        st.served_digest = digest
        st.digest_match = digest is not None and digest == want
        rec.verified = st.digest_match
        if st.digest_match:
            st.verified[plan.target] = digest
            return
        st.verified.pop(plan.target, None)
        if digest is None:  # no verdict (vLLM gone): the supervisor restarts it and identify() decides
            return
        st.digest_mismatches += 1
        st.resyncs_from_anchor += 1
        rec.error = (f"DigestMismatch: served weights hash to {digest}, v{plan.target} is {want}; stopped claiming "
                     "the version, resyncing from the newest anchor")
        log.error("%s", rec.error)
        self.forget_version()
        self._avoid_deltas = True

    async def _after_failed_apply(self, before: int | None) -> None:
        """The worker validates every file before writing, so a rejected update leaves the last good version in
        place -- unless it failed after writing started, which the engine records as inconsistent."""
        try:
            status = await self.control.worker_status()
        except VllmError as exc:
            log.error("cannot read the worker state after a failed update (%s)", exc)
            status = {}
        if not status.get("consistent", False):
            log.error("served weights are no longer a known version; resyncing from the newest anchor")
            self.forget_version()
            self._avoid_deltas = True
        else:
            self.state.served_version = before

    def status(self) -> dict:
        st = self.state
        lag = None if st.latest_version is None or st.served_version is None else st.latest_version - st.served_version
        hist = list(st.history)
        return {
            "served_version": st.served_version, "served_digest": st.served_digest, "digest_match": st.digest_match,
            "latest_version": st.latest_version, "latest_digest": st.latest_digest, "lag": lag,
            "syncs": st.syncs, "failures": st.failures, "resyncs_from_anchor": st.resyncs_from_anchor,
            "digest_mismatches": st.digest_mismatches,
            "verify": self.verify, "poll_interval_s": self.poll_interval, "paused": self.paused,
            "syncing": self.syncing, "verifying": self.verifying,
            "last_sync": st.last.model_dump() if st.last else None,
            "recent_syncs": [r.model_dump() for r in hist[-10:]],
            "pause_ms": _pause_summary(hist),
            # resume -> full-digest verdict: the window in which a wrong weight could be served undetected
            "verify_window_ms": _summary(r.verify_window_s * 1e3 for r in hist if r.verify_window_s is not None),
            # Bounded: a long run keeps only the newest entries on /status (JSON keys are strings).
            "verified_versions": {str(v): st.verified[v] for v in sorted(st.verified)[-VERIFIED_ON_STATUS:]},
        }
