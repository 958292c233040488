"""`dws verify BUCKET`: replay the whole kept history and prove every stored version.

Starting from the oldest kept anchor, every delta is applied in order; every file's sha256 (each part of a version
in parts, and each part's slice header) and every version's weights digest (with the algorithm the digest names) is
checked; every later anchor must equal the replayed state. The first bad version is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shared.bucket import open_bucket
from shared.digest import algorithm_of, weights_digest
from shared.errors import ChainError, DigestMismatch, DwsError
from shared.follower import Follower, SyncPlan
from shared.manifest import read_manifest


@dataclass
class VerifyResult:
    ok: bool = True
    checked: int = 0
    first_bad: int | None = None
    lines: list[str] = field(default_factory=list)

    def fail(self, version: int | None, msg: str) -> None:
        self.ok = False
        if self.first_bad is None:
            self.first_bad = version
        self.lines.append(f"FAIL v{version}: {msg}")

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "first_bad": self.first_bad}


def verify_bucket(address: str, *, token: str | None = None) -> VerifyResult:
    res = VerifyResult()
    bucket = open_bucket(address, token=token)
    m = read_manifest(bucket)
    if m is None:
        raise ChainError(f"bucket {bucket.address} has no manifest")
    res.lines.append(f"bucket {bucket.address}: latest v{m.latest}, {len(m.anchors)} anchor(s), "
                     f"{len(m.deltas)} delta(s), model {m.model.name or '?'} ({m.model.numel:,} elements)")
    if not m.anchors:
        res.fail(None, "no anchor kept: the chain cannot be replayed")
        return res
    follower = Follower(bucket)
    entries = sorted([*m.anchors, *m.deltas], key=lambda e: (e.version, e.base is None))  # a version's delta before its anchor
    start = m.anchors[0].version
    state: dict[str, torch.Tensor] = {}
    state_version: int | None = None
    for e in entries:
        if e.version < start or (e.version == start and e.base is not None):
            continue  # deltas before the oldest kept anchor have no base to replay onto
        algo = algorithm_of(e.digest)
        what = "anchor" if e.base is None else "delta"
        parts = f" in {len(e.parts)} parts" if e.parts else ""
        try:
            plan = SyncPlan(None if e.base is None else state_version, e.version, e.digest, (e,))
            if e.base is None:
                fresh: dict[str, torch.Tensor] = {}
                try:
                    # Every file's sha256 and every part's slice header are checked before anything is applied.
                    follower.apply_plan(fresh, plan, m, verify=True)
                except DigestMismatch:
                    res.fail(e.version, f"anchor {e.describe_path()}{parts} does not hash to its manifest digest")
                    return res
                # Only a state replayed up to this very version can be compared: two anchors in a row (a delta
                # larger than an anchor is not stored) leave the previous version's state here.
                if state_version == e.version and weights_digest(state, algorithm=algo) != e.digest:
                    res.fail(e.version, f"anchor {e.describe_path()}{parts} differs from the replayed deltas")
                    return res
                state = fresh
            else:
                if e.base != state_version:
                    res.fail(e.version, f"delta names base v{e.base}, but the replay is at v{state_version}")
                    return res
                try:
                    follower.apply_plan(state, plan, m, verify=True)
                except DigestMismatch:
                    res.fail(e.version, f"after delta {e.describe_path()}{parts} the weights do not match the "
                             "manifest digest")
                    return res
            state_version = e.version
        except DwsError as exc:
            res.fail(e.version, str(exc))
            return res
        res.checked += 1
        res.lines.append(f"ok   v{e.version} {what:<6} {e.bytes:>12,} B  {e.digest}{parts}")
    res.lines.append(f"OK: {res.checked} file(s) verified, latest v{m.latest} reproduced bit-exactly"
                     if res.ok else "FAILED")
    return res
