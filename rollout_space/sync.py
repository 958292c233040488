"""The replica's sync loop: keep the served weights on the bucket's latest version (docs/design.md §3.4 rules 4-5, §6.1).

Each round: read the manifest (cheap etag check), plan the shortest verified path from the served version, download
every file and check its sha256 and decode/validate it against the model identity -- all *outside* the pause -- then
pause vLLM (requests held, not dropped), apply every step in place, resume. The served version changes only when
the plugin reports success; when a digest mismatches the replica stops claiming any version and resyncs from the
newest anchor, and on any other failure it keeps serving its last good version.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from shared.errors import DwsError
from shared.follower import Follower, SyncPlan
from shared.manifest import Manifest

from rollout_space.vllm_proc import VllmControl, VllmError

log = logging.getLogger("dws.rollout.sync")

VERIFY_MODES = ("every", "anchors")


@dataclass
class SyncRecord:
    """One sync round, as /status and the dashboard show it."""

    started: float
    plan: str
    from_version: int | None
    to_version: int | None
    bytes: int = 0
    download_s: float = 0.0
    pause_s: float = 0.0
    apply_s: float = 0.0
    ok: bool = False
    error: str | None = None


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
    last: SyncRecord | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=50))
    versions_served: list[int] = field(default_factory=list)  # every version this replica has served, in order
    # version -> digest this replica proved it held after applying that version (checked by the plugin inside the
    # pause, then measured again after resume for the target). An end-to-end check compares these with the trainer's
    # own digests, so a version counts here only once its bytes were hashed on the replica, never from the manifest.
    verified: dict[int, str] = field(default_factory=dict)


VERIFIED_ON_STATUS = 512


def _pause_summary(history) -> dict:
    """Median / max pause of the recent successful syncs that paused vLLM (a sync rejected before the pause has
    pause 0 and would drag the median down)."""
    pauses = sorted(r.pause_s * 1e3 for r in history if r.ok and r.pause_s > 0)
    if not pauses:
        return {"count": 0, "median": None, "max": None}
    return {"count": len(pauses), "median": round(statistics.median(pauses), 1), "max": round(pauses[-1], 1)}


class Syncer:
    def __init__(self, follower: Follower, control: VllmControl, *, verify: str = "every",
                 poll_interval: float = 3.0, apply_mode: str = "loader"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}")
        self.follower = follower
        self.control = control
        self.verify = verify
        self.apply_mode = apply_mode  # "loader": vLLM's checkpoint patch loader; "direct": index writes (TP=1)
        self.poll_interval = poll_interval
        self.state = SyncState()
        self.paused = False
        self.syncing = False
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
            digest = await self.control.digest()
            m = await asyncio.to_thread(self.follower.manifest)
        except (VllmError, DwsError) as exc:
            log.warning("could not identify the served weights: %s", exc)
            return
        self.state.served_digest = digest
        if m is None:
            return
        for e in (*m.anchors, *m.deltas):
            if e.digest == digest:
                self.state.served_version = e.version
                self.state.digest_match = True
                self.state.verified[e.version] = digest
                log.info("served weights are bucket version v%d (digest match)", e.version)
                return
        log.info("served weights are not a kept bucket version; will start from an anchor")

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
        try:
            t0 = time.perf_counter()
            files = await asyncio.to_thread(self.follower.fetch, plan)
            # Decode and validate before the pause: a hostile or broken delta never gets near the weights.
            await asyncio.to_thread(lambda: [self.follower.decode(vf, manifest=m) for vf in files])
            rec.download_s = time.perf_counter() - t0
            await self._apply(files, plan, rec, m)
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
        return rec

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

    async def _apply(self, files, plan: SyncPlan, rec: SyncRecord, m: Manifest) -> None:
        st = self.state
        t_pause = time.perf_counter()
        await self.control.pause()
        self.paused = True
        expected = st.served_digest or (m.digest_of(st.served_version) if st.served_version is not None else None)
        try:
            await self.control.start_update()
            t_apply = time.perf_counter()
            for vf in files:
                e = vf.entry
                check = self.verify == "every" or e.base is None
                info = {"path": str(vf.path), "kind": "anchor" if e.base is None else "delta", "version": e.version,
                        "base": e.base, "expected_digest": e.digest if check else None, "verify": check,
                        "decoder": "shared.formats:read_for_replica", "apply_mode": self.apply_mode}
                try:
                    await self.control.update(info)
                except VllmError:
                    # The plugin validates before writing, so a rejected patch leaves the last good version in
                    # place -- but prove it (still inside the pause) rather than trust it.
                    await self._recheck(expected)
                    raise
                st.served_version = e.version
                st.served_digest = e.digest if check else None
                st.digest_match = True if check else None
                if check:
                    st.verified[e.version] = e.digest
                expected = e.digest
            rec.apply_s = time.perf_counter() - t_apply
            await self.control.finish_update(plan.target)
        finally:
            try:
                await self.control.resume()
            finally:
                self.paused = False
                rec.pause_s = time.perf_counter() - t_pause
        st.versions_served.append(plan.target)
        if self.verify == "every":
            # An independent measurement of what vLLM serves, outside the pause (the plugin also checked inside).
            try:
                st.served_digest = await self.control.digest()
            except VllmError as exc:
                log.warning("could not read the served digest: %s", exc)
                st.served_digest = None
            st.digest_match = st.served_digest == m.digest_of(plan.target)
            if st.digest_match:
                st.verified[plan.target] = st.served_digest
            else:
                st.verified.pop(plan.target, None)
                log.error("served digest %s differs from v%d's %s; resyncing from the newest anchor",
                          st.served_digest, plan.target, m.digest_of(plan.target))
                self.forget_version()
                self._avoid_deltas = True
        async with self.version_changed:
            self.version_changed.notify_all()
        log.info("now serving v%d (%s; download %.3fs, pause %.1f ms, apply %.1f ms)", plan.target, plan.describe(),
                 rec.download_s, rec.pause_s * 1e3, rec.apply_s * 1e3)

    async def _recheck(self, expected: str | None) -> None:
        try:
            digest = await self.control.digest()
        except VllmError as exc:
            log.error("cannot read the served digest after a failed update (%s)", exc)
            digest = None
        if expected is None or digest != expected:
            log.error("served weights are no longer a known version; resyncing from the newest anchor")
            self.forget_version()
            self._avoid_deltas = True

    def status(self) -> dict:
        st = self.state
        lag = None if st.latest_version is None or st.served_version is None else st.latest_version - st.served_version
        return {
            "served_version": st.served_version, "served_digest": st.served_digest, "digest_match": st.digest_match,
            "latest_version": st.latest_version, "latest_digest": st.latest_digest, "lag": lag,
            "syncs": st.syncs, "failures": st.failures, "resyncs_from_anchor": st.resyncs_from_anchor,
            "verify": self.verify, "apply_mode": self.apply_mode, "poll_interval_s": self.poll_interval, "paused": self.paused,
            "syncing": self.syncing,
            "last_sync": asdict(st.last) if st.last else None,
            "recent_syncs": [asdict(r) for r in list(st.history)[-10:]],
            "pause_ms": _pause_summary(st.history),
            # Bounded: a long run keeps only the newest entries on /status (JSON keys are strings).
            "verified_versions": {str(v): st.verified[v] for v in sorted(st.verified)[-VERIFIED_ON_STATUS:]},
        }
