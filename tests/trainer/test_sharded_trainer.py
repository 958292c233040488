"""The trainer Space sharded: `torchrun --nproc_per_node 2 -m trainer_space`, FSDP2 on CPU/gloo, TRL's
AsyncGRPOTrainer, against the suite's real rollout replica (vLLM) and env server (conftest `services`).

One module-scoped pair of runs on the suite's bucket, after `run1` left a single-process history in it:
1. two ranks continue that history (each rank re-splits it into its own rows, proven against the manifest digest)
   and train until rank 1 is SIGKILLed half-way through uploading its part of the 5th version;
2. the restart continues from the last committed version.
Asserted: the killed version was never committed and `dws verify` passes; every version of both runs is two parts
in the bucket, its digest equals the single-process digest of the weights the ranks trained (assembled by the test
from each rank's rows), a follower replays it bit-exactly, and the real replica served and verified it bit-exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dws_testing import REPO, free_port, stop_process_group
from shared.bucket import open_bucket
from shared.digest import weights_digest
from shared.follower import Follower, SyncPlan
from shared.manifest import read_manifest
from shared.verify import verify_bucket
from trainer_helpers import TOKEN, bucket_latest, sync_replica

pytestmark = pytest.mark.slow
KILLED_AT = 5  # rank 1 dies uploading the 5th version of the first run


def torchrun(services, tmp: Path, name: str, *, steps: int, serve: bool = False,
             **extra: str) -> tuple[int | None, str, dict | None]:
    """Run the trainer Space on 2 ranks. `serve`: like a Space, rank 0 keeps its dashboard up when training is done;
    its /status is read then and the job stopped (rc None)."""
    log = tmp / f"{name}.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWS_") and k != "SPACE_ID"}
    env.update({"DWS_MODEL": str(services["model"]), "DWS_BUCKET": str(services["bucket"]),
                "DWS_ROLLOUT_URLS": services["gw"].url, "DWS_ENV_URL": services["env"].url,
                "DWS_ROLLOUT_TOKEN": TOKEN, "DWS_TASK": "short", "DWS_STEPS": str(steps), "DWS_LR": "0.01",
                "DWS_PROMPTS_PER_STEP": "2", "DWS_GROUP_SIZE": "4", "DWS_MAX_COMPLETION_LENGTH": "8",
                "DWS_KEEP_ANCHORS": "50", "DWS_RUN_ID": "sharded-trainer-test", "DWS_UI": "false",
                "DWS_EXIT_WHEN_DONE": "false" if serve else "true",
                "DWS_OUTPUT_DIR": str(tmp / "out"), "HOST": "127.0.0.1", "PORT": str(port),
                "DWS_TEST_DUMP_ROWS": str(tmp / "rows"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "trainer_space"]
    rc, status = None, None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # The deadlines only stop a hung run from hanging the suite; nothing timed is asserted.
            deadline = time.time() + 600
            while serve and proc.poll() is None and time.time() < deadline:
                try:
                    st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=30).json()
                    if st["phase"] in ("done", "failed"):
                        status = st
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            if not serve:
                rc = proc.wait(timeout=600)
        finally:
            stop_process_group(proc, timeout=10)
    return rc, log.read_text(errors="replace"), status


def reference(rows: Path, version: int) -> dict[str, torch.Tensor]:
    """The trainer's full bf16 weights at a version, assembled by the test from the rows each rank published."""
    r0, r1 = (torch.load(rows / f"v{version}.rank{k}.pt") for k in range(2))
    return {n: torch.cat([r0[n], r1[n]]) for n in r0}


@pytest.fixture(scope="module")
def sharded(run1, services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded-trainer")
    start = bucket_latest(services["bucket"])
    sync_replica(services["gw"], start)
    before = services["gw"].status()
    killed = start + KILLED_AT
    rc1, log1, _ = torchrun(services, tmp, "killed", steps=KILLED_AT, DWS_TEST_FAULT_KILL_RANK_AT=f"1:{killed}")
    after_kill = bucket_latest(services["bucket"])
    verified_after_kill = verify_bucket(str(services["bucket"]))
    _, log2, status = torchrun(services, tmp, "restart", steps=2, serve=True)
    final = bucket_latest(services["bucket"])
    return {"tmp": tmp, "start": start, "killed": killed, "rc1": rc1, "log1": log1, "after_kill": after_kill,
            "verified_after_kill": verified_after_kill, "status": status, "log2": log2, "final": final,
            "before": before}


def test_rank_killed_mid_upload_leaves_the_version_uncommitted(sharded):
    s = sharded
    assert s["rc1"] != 0 and "FAULT INJECTION: rank 1 stored half" in s["log1"], s["log1"][-4000:]
    # The two ranks continued run1's single-process history: re-split into each rank's rows and proven.
    assert "re-split" in s["log1"] and f"rebuilt its rows of v{s['start']}" in s["log1"], s["log1"][-4000:]
    # Rank 0 may or may not have committed the version before it (its commit races torchrun stopping it); the
    # killed version it can never have committed.
    assert s["after_kill"] in (s["killed"] - 2, s["killed"] - 1), s["log1"][-4000:]
    assert s["verified_after_kill"].ok, s["verified_after_kill"].lines


def test_restart_continues_from_the_last_committed_version(sharded, services):
    s = sharded
    assert s["status"] is not None and s["status"]["phase"] == "done", s["log2"][-4000:]
    assert "[rank 1/2]: done:" in s["log2"] and "[rank 0/2]: done:" in s["log2"]
    # Each rank read back only its own part of every version since the anchor, and the ranks proved the digest.
    assert f"rebuilt its rows of v{s['after_kill']}" in s["log2"] and "re-split" not in s["log2"]
    assert s["final"] == s["after_kill"] + 2
    res = verify_bucket(str(services["bucket"]))
    assert res.ok, res.lines


def test_every_version_is_two_parts_with_the_single_process_digest(sharded, services):
    s = sharded
    m = read_manifest(open_bucket(services["bucket"]))
    versions = range(s["start"] + 1, s["final"] + 1)
    f = Follower(services["bucket"], download_workers=2)
    # A follower at run1's last version (its newest anchor at or before it, then its deltas) ...
    state: dict = {}
    current = None
    for v in range(max(a.version for a in m.anchors if a.version <= s["start"]), s["start"] + 1):
        e = m.anchor(v) if current is None else m.delta(v)
        f.apply_plan(state, SyncPlan(current, v, e.digest, (e,)), m)
        current = v
    # ... then one sharded version at a time: each is two parts and the follower stays bit-exact with the ranks.
    for v in versions:
        e = m.delta(v) if m.delta(v) is not None else m.anchor(v)
        assert e is not None and len(e.parts) == 2, (v, e)
        ref = reference(s["tmp"] / "rows", v)
        assert e.digest == weights_digest(ref), v  # the digest of a single process holding the same weights
        f.apply_plan(state, SyncPlan(current if e.base is not None else None, v, e.digest, (e,)), m)
        assert all(torch.equal(state[n].view(torch.int16), ref[n].view(torch.int16)) for n in ref), v
        current = v
    # The first sharded version is a delta on run1's last single-process version (the restore was proven).
    assert m.delta(s["start"] + 1) is not None and m.delta(s["start"] + 1).base == s["start"]


def test_the_replica_served_every_version_bit_exactly(sharded, services):
    s = sharded
    st = sync_replica(services["gw"], s["final"])
    assert st["digest_match"] is True
    m = read_manifest(open_bucket(services["bucket"]))
    verified = {int(k): d for k, d in st["verified_versions"].items() if int(k) > s["start"]}
    # The replica follows on its own (1 s poll + the trainer's nudge): it may skip a version it was too slow for,
    # but every version it served is verified against the manifest's digest, the sharded digest of the trainer.
    assert len(verified) >= 3 and s["final"] in verified, verified
    for v, d in verified.items():
        assert d == m.digest_of(v) == weights_digest(reference(s["tmp"] / "rows", v)), v
    assert st["digest_mismatches"] == s["before"]["digest_mismatches"]
    r = httpx.get(f"{services['gw'].url}/health", timeout=10)
    assert r.status_code == 200


def test_rank_0_serves_the_dashboard_with_whole_versions(sharded):
    """Rank 0 is the Space: its /status shows the run, and each published version as a whole (every rank's part),
    not rank 0's half."""
    st, s = sharded["status"], sharded
    hist = st["sync"]["history"]
    assert [h["version"] for h in hist] == [s["after_kill"] + 1, s["after_kill"] + 2]
    for h in hist:
        ref, prev = (reference(s["tmp"] / "rows", v) for v in (h["version"], h["version"] - 1))
        whole = sum(t.numel() for t in ref.values())
        # An optimizer step may change nothing (a batch whose groups all scored alike has zero advantages): the
        # count is checked against the ranks' own weights, both halves, not against "some change".
        changed = sum(int((ref[n].view(torch.int16) != prev[n].view(torch.int16)).sum()) for n in ref)
        assert (h["total"], h["changed"]) == (whole, changed), h
        # The version's parts together (two), where rank 0's own part is one of them.
        assert h["bytes"] == (h["delta_bytes"] or 0) + (h["anchor_bytes"] or 0) > h["part_bytes"] > 0
    assert st["training"]["step"] == 2 and st["rollouts"]["groups"] >= 2
    assert st["config"]["rollout_token"] == "set"
