"""The replica side, framework-agnostic: "I am at version v (or nothing): what do I apply to reach the latest?"

`Follower.plan(current)` answers with the cheapest verified path (docs/design.md §3.4 rule 4): the deltas after `current`
when their chain is whole, otherwise the newest anchor whose chain reaches the latest, plus the deltas after it;
when both exist, the one with fewer bytes to download. `fetch()` downloads every file of a plan and checks each
sha256 before anything is applied (rule 5). `decode()` turns a verified file into a `PatchFile`, validated against
the manifest's model identity. Applying is someone else's job: `apply_to_state()` below does it for a plain dict of
torch tensors (tests, CLI, a trainer restarting); the vLLM plugin does it inside the inference engine.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.bucket import Bucket, BucketEntry, open_bucket
from shared.digest import algorithm_of, weights_digest
from shared.errors import ChainError, DigestMismatch, DwsError, FormatError, IntegrityError
from shared.formats import PatchFile, bits, read_patch_file
from shared.manifest import MANIFEST_PATH, FileEntry, Manifest, read_manifest, sha256_file

log = logging.getLogger("dws.follower")


@dataclass(frozen=True)
class SyncPlan:
    """Files to apply, in order, to go from `current` to `target`. An empty plan means already up to date."""

    current: int | None
    target: int
    target_digest: str
    steps: tuple[FileEntry, ...]

    @property
    def from_anchor(self) -> bool:
        return bool(self.steps) and self.steps[0].base is None

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.steps)

    def describe(self) -> str:
        if not self.steps:
            return f"up to date at v{self.target}"
        kinds = "anchor v%d + %d delta(s)" % (self.steps[0].version, len(self.steps) - 1) if self.from_anchor \
            else f"{len(self.steps)} delta(s)"
        return f"v{self.current} -> v{self.target}: {kinds}, {self.bytes:,} bytes"


@dataclass(frozen=True)
class VerifiedFile:
    """A downloaded file whose size and sha256 match the manifest. For a version in parts there is one per part,
    in index order: apply them one by one, and check the version's digest (`entry.digest`) only after `last_part`.
    `slices` (name -> rows [r0, r1) of the full tensor, from the part's checked header) says where each of the
    part's tensors goes; see shared/parts.py for the header."""

    entry: FileEntry
    path: Path
    part: int | None = None  # index of this part; None for a single-file version
    parts: int = 1
    slices: dict[str, tuple[int, int]] | None = None

    @property
    def version(self) -> int:
        return self.entry.version

    @property
    def kind(self) -> str:
        return "anchor" if self.entry.base is None else "delta"

    @property
    def last_part(self) -> bool:
        """True for the file after which the version is complete (the only file of a single-file version)."""
        return self.part is None or self.part == self.parts - 1


def _delta_chain(m: Manifest, start: int, target: int) -> list[FileEntry] | None:
    """Deltas leading from `start` to `target`, following base links backwards; None when the chain breaks."""
    chain: list[FileEntry] = []
    v = target
    while v != start:
        d = m.delta(v)
        if d is None or d.base is None or d.base < start:
            return None
        chain.append(d)
        v = d.base
    return chain[::-1]


def plan_sync(m: Manifest, current: int | None, *, avoid_deltas_from: int | None = None) -> SyncPlan:
    candidates: list[list[FileEntry]] = []
    if current is not None and current == m.latest:
        return SyncPlan(current, m.latest, m.latest_digest, ())
    if current is not None and current < m.latest and avoid_deltas_from is None:
        chain = _delta_chain(m, current, m.latest)
        if chain is not None:
            candidates.append(chain)
    for anchor in reversed(m.anchors):
        chain = _delta_chain(m, anchor.version, m.latest)
        if chain is not None:
            candidates.append([anchor, *chain])
            break  # the newest reachable anchor is always the cheapest of the anchor paths
    if not candidates:
        raise ChainError(f"no anchor in the manifest leads to v{m.latest}, and no delta chain from v{current}")
    best = min(candidates, key=lambda steps: sum(s.bytes for s in steps))
    return SyncPlan(current, m.latest, m.latest_digest, tuple(best))


class Follower:
    def __init__(self, bucket: Bucket | str, *, cache_dir: str | Path | None = None, token: str | None = None,
                 download_workers: int = 4):
        if download_workers < 1:
            raise ValueError("download_workers must be >= 1")
        self.bucket = bucket if isinstance(bucket, Bucket) else open_bucket(bucket, token=token)
        self.download_workers = download_workers
        self._own_cache = cache_dir is None
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="dws-cache-"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._manifest: Manifest | None = None
        self._etag: BucketEntry | None = None

    def __del__(self):
        if getattr(self, "_own_cache", False):
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- manifest
    def manifest(self, *, refresh: bool = True) -> Manifest | None:
        """The current manifest. With refresh, re-read only when its etag changed (cheap polling)."""
        if refresh or self._manifest is None:
            st = self.bucket.stat(MANIFEST_PATH)
            if st is None:
                self._manifest, self._etag = None, None
            elif self._manifest is None or st.etag is None or st != self._etag:
                self._manifest = read_manifest(self.bucket)
                self._etag = st
        return self._manifest

    def plan(self, current: int | None, *, manifest: Manifest | None = None,
             avoid_deltas_from: int | None = None) -> SyncPlan:
        m = manifest or self.manifest()
        if m is None:
            raise ChainError(f"bucket {self.bucket.address} has no manifest yet (nothing published)")
        return plan_sync(m, current, avoid_deltas_from=avoid_deltas_from)

    # --------------------------------------------------------------------------------------------- files
    def fetch(self, plan: SyncPlan, *, manifest: Manifest | None = None) -> list[VerifiedFile]:
        """Download every file of the plan (a version's parts in parallel, at most `download_workers` at a time) and
        check its size and sha256, and each part's slice header against the model and layout. All or nothing:
        raises IntegrityError (a bad or missing file) or FormatError (a hostile part header) before anything can be
        applied."""
        m = manifest or self._manifest
        jobs = []  # (entry, path, bytes, sha256, part index or None)
        for e in plan.steps:
            for k, (path, size, sha) in enumerate(e.files):
                jobs.append((e, path, size, sha, k if e.parts else None))
        if len(jobs) > 1 and self.download_workers > 1:
            with ThreadPoolExecutor(max_workers=min(self.download_workers, len(jobs)),
                                    thread_name_prefix="dws-fetch") as pool:
                results = list(pool.map(lambda job: self._fetch_one(*job, m), jobs))
        else:
            results = [self._fetch_one(*job, m) for job in jobs]
        return results

    def _fetch_one(self, e: FileEntry, path: str, size: int, sha: str, part: int | None,
                   m: Manifest | None) -> VerifiedFile:
        local = self.cache_dir / path
        if not (local.is_file() and local.stat().st_size == size and sha256_file(local) == sha):
            try:
                self.bucket.download(path, local)
            except FileNotFoundError:
                raise IntegrityError(f"v{e.version}: {path} is listed in the manifest but missing",
                                     version=e.version) from None
            got = local.stat().st_size
            if got != size or sha256_file(local) != sha:
                local.unlink(missing_ok=True)
                raise IntegrityError(f"v{e.version}: {path} fails its sha256 check ({got} bytes, manifest "
                                     f"says {size}); not applied", version=e.version)
        if part is None:
            return VerifiedFile(e, local)
        from shared.parts import part_info

        info = part_info(local, shapes=m.model.shapes if m else None, index=part, count=len(e.parts))
        return VerifiedFile(e, local, part, len(e.parts), info.slices)

    def decode(self, vf: VerifiedFile, *, manifest: Manifest | None = None) -> PatchFile:
        """Decode and validate a verified file against the model identity and the manifest entry."""
        m = manifest or self._manifest
        shapes = m.model.shapes if m else None
        if vf.part is not None:
            # A part holds row slices: its tensors have the slices' shapes, checked against the full ones.
            from shared.parts import read_part

            pf, _ = read_part(vf.path, shapes=shapes, index=vf.part, count=vf.parts, version=vf.entry.version,
                              base=vf.entry.base)
            if (pf.kind == "anchor") != (vf.entry.base is None):
                raise FormatError(f"{vf.path.name}: manifest and file disagree on whether this is an anchor")
            return pf
        pf = read_patch_file(vf.path, shapes=shapes, base=vf.entry.base)
        validate_patch(pf, vf.entry, shapes)
        return pf

    def prune_cache(self, keep: set[str] = frozenset()) -> None:
        """Remove cached files not named in `keep` (bucket paths): a long-running replica must not fill its disk."""
        for p in self.cache_dir.rglob("*.safetensors"):
            if p.relative_to(self.cache_dir).as_posix() not in keep:
                p.unlink(missing_ok=True)

    def updates(self, current: int | None) -> Iterator[tuple[FileEntry, PatchFile]]:
        """Fetch (all verified first) then yield each decoded patch in order."""
        m = self.manifest()
        plan = self.plan(current, manifest=m)
        for vf in self.fetch(plan, manifest=m):
            if vf.part is not None:
                raise FormatError(f"v{vf.version} is stored in parts; apply them with sync_state() or fetch()")
            yield vf.entry, self.decode(vf, manifest=m)

    # --------------------------------------------------------------------------------------------- plain dicts
    def sync_state(self, state: MutableMapping[str, torch.Tensor], current: int | None, *,
                   verify: bool = True) -> int:
        """Bring a dict of bf16 tensors from `current` to the latest version; returns the version reached.

        Tries the cheapest plan; if a file is missing/corrupt or a digest mismatches, retries once from the newest
        anchor. If that fails too, raises -- `state` then holds the last version whose digest verified (or is
        untouched), never a half-applied one.
        """
        m = self.manifest()
        if m is None:
            raise ChainError(f"bucket {self.bucket.address} has no manifest yet")
        plan = self.plan(current, manifest=m)
        try:
            return self._run_plan(state, plan, m, verify=verify)
        except DwsError as exc:
            if plan.from_anchor or current is None:
                raise
            log.warning("delta path from v%s failed (%s); resyncing from the newest anchor", current, exc)
            return self._run_plan(state, self.plan(current, manifest=m, avoid_deltas_from=current), m, verify=verify)

    def apply_plan(self, state: MutableMapping[str, torch.Tensor], plan: SyncPlan, manifest: Manifest, *,
                   verify: bool = True) -> int:
        """Fetch and apply one plan to a plain dict, checking each version's digest (no fallback; `sync_state`
        adds the retry from an anchor). Raises DigestMismatch naming the first version that does not match."""
        return self._run_plan(state, plan, manifest, verify=verify)

    def _run_plan(self, state, plan: SyncPlan, m: Manifest, *, verify: bool) -> int:
        files = self.fetch(plan, manifest=m)
        # Single files decode before any is applied; a version in parts decodes one part at a time (memory bounded
        # by one part), its part headers having been checked by fetch(), and rolls back if a later part is bad.
        patches = {id(vf): self.decode(vf, manifest=m) for vf in files if vf.part is None}
        version = plan.current
        i = 0
        while i < len(files):
            vf = files[i]
            if vf.part is not None:
                group = files[i:i + vf.parts]
                self._apply_parts(state, group, m, verify=verify)
                version = vf.version
                i += vf.parts
                continue
            pf = patches[id(vf)]
            if pf.kind == "anchor":
                # Stage on a copy: an anchor replaces everything, so a bad one must not wipe a good state.
                staged: dict[str, torch.Tensor] = {}
                apply_to_state(staged, pf)
                if verify and weights_digest(staged, algorithm=algorithm_of(vf.entry.digest)) != vf.entry.digest:
                    raise DigestMismatch(f"anchor v{pf.version} does not hash to its manifest digest",
                                         version=pf.version)
                state.clear()
                state.update(staged)
            else:
                apply_to_state(state, pf)
                if verify and weights_digest(state, algorithm=algorithm_of(vf.entry.digest)) != vf.entry.digest:
                    raise DigestMismatch(f"after v{pf.version} the weights do not match the manifest digest",
                                         version=pf.version)
            version = pf.version
            i += 1
        return plan.target if plan.steps else version

    def _apply_parts(self, state, group: list[VerifiedFile], m: Manifest, *, verify: bool) -> None:
        """Apply every part of one version. An anchor's parts fill a staged model (swapped in once complete and
        verified); a delta's parts write in place, keeping each touched element's old value so that a bad later
        part, or a digest mismatch, puts `state` back to the version before."""
        from shared.parts import apply_part, read_part, undo_part

        e = group[0].entry
        if len(group) != len(e.parts) or [vf.part for vf in group] != list(range(len(e.parts))):
            raise FormatError(f"v{e.version}: the plan does not hold every part of the version")
        shapes = m.model.shapes
        anchor = e.base is None
        target = {n: torch.empty(s, dtype=torch.bfloat16) for n, s in shapes.items()} if anchor else state
        undo: list = []
        try:
            for vf in group:
                pf, info = read_part(vf.path, shapes=shapes, index=vf.part, count=vf.parts, version=e.version,
                                     base=e.base)
                if (pf.kind == "anchor") != anchor:
                    raise FormatError(f"{vf.path.name}: manifest and file disagree on whether this is an anchor")
                undo.extend(apply_part(target, pf, info))
                del pf  # one decoded part at a time
            if verify and weights_digest(target, algorithm=algorithm_of(e.digest)) != e.digest:
                raise DigestMismatch(f"after v{e.version} ({len(group)} parts) the weights do not match the manifest "
                                     "digest", version=e.version)
        except BaseException:
            if not anchor:
                undo_part(undo[::-1])
            raise
        if anchor:
            state.clear()
            state.update(target)

    def materialize(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The latest version as a fresh dict (newest anchor + deltas), digest-verified."""
        state: dict[str, torch.Tensor] = {}
        version = self.sync_state(state, None)
        return version, state


def validate_patch(pf: PatchFile, entry: FileEntry, shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Names, shapes, version and base must all agree with the manifest before a patch may touch weights."""
    if pf.version != entry.version:
        raise FormatError(f"{entry.path}: file says v{pf.version}, manifest says v{entry.version}")
    if pf.kind == "delta" and pf.base != entry.base:
        raise FormatError(f"{entry.path}: file says base v{pf.base}, manifest says v{entry.base}")
    if (pf.kind == "anchor") != (entry.base is None):
        raise FormatError(f"{entry.path}: manifest and file disagree on whether this is an anchor")
    if shapes is None:
        return
    for name, shape in pf.shapes.items():
        if name not in shapes:
            raise FormatError(f"{entry.path}: unknown tensor {name!r}")
        if tuple(shape) != tuple(shapes[name]):
            raise FormatError(f"{entry.path}: {name} has shape {tuple(shape)}, the model has {tuple(shapes[name])}")
    if pf.kind == "anchor" and set(pf.shapes) != set(shapes):
        missing = sorted(set(shapes) - set(pf.shapes))[:3]
        raise FormatError(f"{entry.path}: anchor lacks tensors {missing}")


def apply_to_state(state: MutableMapping[str, torch.Tensor], pf: PatchFile) -> None:
    """Apply a decoded patch to a dict of bf16 tensors in place. Validates and resolves every tensor first, then
    writes: an error leaves `state` untouched."""
    if pf.kind == "anchor":
        for name, t in pf.tensors.items():
            state[name] = t.clone()
        return
    staged = []
    for name, dec in pf.tensors.items():
        if name not in state:
            raise FormatError(f"v{pf.version}: tensor {name!r} is not in the state")
        target = state[name]
        if tuple(target.shape) != tuple(pf.shapes[name]) or target.dtype != torch.bfloat16:
            raise FormatError(f"v{pf.version}: {name} is {tuple(target.shape)} {target.dtype}, the patch expects "
                              f"{tuple(pf.shapes[name])} bf16")
        if not target.is_contiguous():
            # bits() of a non-contiguous tensor is a copy, and writes into a copy would be silently lost.
            state[name] = target = target.contiguous()
        flat = bits(target).reshape(-1)
        if dec.needs_base_context:  # codec v2 (ctx): decoding reads the whole base tensor
            dec = dec.decode(flat)
        base = flat[dec.positions] if dec.needs_base else None
        staged.append((flat, dec.positions, dec.resolve(base)))
    for flat, positions, values in staged:
        flat[positions] = values  # `flat` is a view of the tensor's storage: this writes in place


__all__ = ["Follower", "SyncPlan", "VerifiedFile", "apply_to_state", "plan_sync", "validate_patch"]
