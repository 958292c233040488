"""Sharded publishing for real: two processes under torchrun, gloo, FSDP2 (`fully_shard`) training the tiny Qwen3,
each rank publishing its own rows (tests/shared/sharded_worker.py). Every version is two parts in the bucket; a
follower rebuilds every version bit-exactly; the digest equals the single-process digest of the same weights (and
the single-process Publisher's); a rank SIGKILLed mid-upload leaves that version uncommitted and the bucket
verifiable, and the restarted run continues from the last committed version with a delta on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dws_testing import REPO, free_port

from shared.bucket import open_bucket
from shared.digest import weights_digest
from shared.follower import Follower, SyncPlan
from shared.manifest import part_path, read_manifest
from shared.publisher import Publisher
from shared.verify import verify_bucket

WORKER = REPO / "tests" / "shared" / "sharded_worker.py"


def torchrun(tmp_path: Path, name: str, *args: str) -> tuple[int, str]:
    log = tmp_path / f"{name}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        # The timeout only stops a hung run from hanging the suite; nothing is asserted about time.
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900,
                              start_new_session=True)
    return proc.returncode, log.read_text(errors="replace")


def reference(dump: Path, version: int) -> dict[str, torch.Tensor]:
    """The trainer's full bf16 weights at a version, assembled *by the test* from what each rank published."""
    r0, r1 = (torch.load(dump / f"v{version}.rank{k}.pt") for k in range(2))
    return {n: torch.cat([r0[n], r1[n]]) if r0[n].dim() else r0[n] for n in r0}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def replay_every_version(bucket_dir, dump: Path, versions) -> None:
    """From the oldest anchor, one version at a time through the Follower: bit-exact against the trainer at each."""
    m = read_manifest(open_bucket(bucket_dir))
    f = Follower(bucket_dir, download_workers=2)
    state: dict = {}
    current = None
    for v in versions:
        e = m.delta(v) if current is not None and m.delta(v) is not None else m.anchor(v)
        assert e is not None, f"v{v} is not in the manifest"
        f.apply_plan(state, SyncPlan(current, v, e.digest, (e,)), m)  # checks the digest too
        assert same(state, reference(dump, v)), f"follower is not bit-exact at v{v}"
        current = v


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    (tmp / "dump").mkdir()
    rc, log = torchrun(tmp, "run", "--model", str(tiny_model_dir), "--bucket", str(tmp / "b"), "--versions", "6",
                       "--anchor-every", "4", "--keep-anchors", "10", "--dump", str(tmp / "dump"))
    assert rc == 0, log[-4000:]
    return tmp


def test_every_version_is_two_parts_and_followers_are_bit_exact(sharded_run):
    b, dump = sharded_run / "b", sharded_run / "dump"
    m = read_manifest(open_bucket(b))
    assert m.latest == 5 and m.digest == "xsum64"
    assert m.anchors[0].version == 0 and all(m.delta(v) or m.anchor(v) for v in range(6))
    assert len(m.deltas) >= 4  # an anchor version stores its delta too unless the delta is the larger
    for e in (*m.anchors, *m.deltas):
        assert len(e.parts) == 2 and e.layout == "dim0-chunks"
        for k, p in enumerate(e.parts):
            assert p.path == part_path(e.version, k, 2, anchor=e.base is None)
            assert (b / p.path).stat().st_size == p.bytes
        # Each rank stored its own half of the rows, not the model.
        assert all(p.bytes < 0.75 * e.bytes for p in e.parts)
    assert not list((b / "receipts").glob("*")), "rank 0 leaves no receipts behind"
    replay_every_version(b, dump, range(6))
    st: dict = {}
    assert Follower(b).sync_state(st, None) == 5 and same(st, reference(dump, 5))
    st = reference(dump, 2)
    assert Follower(b).sync_state(st, 2) == 5 and same(st, reference(dump, 5))  # deltas in parts from v2
    res = verify_bucket(str(b))
    assert res.ok and res.checked == len(m.anchors) + len(m.deltas), res.lines


def test_digest_equals_the_single_process_reference(sharded_run, tmp_path):
    b, dump = sharded_run / "b", sharded_run / "dump"
    m = read_manifest(open_bucket(b))
    pub = Publisher(tmp_path / "single", run_id="single", lease_settle_s=0)
    for v in range(6):
        full = reference(dump, v)
        want = m.delta(v).digest if m.delta(v) else m.anchor(v).digest
        assert weights_digest(full) == want
        pub.publish(full, v)
        pub.flush()
        assert pub.reports[-1].digest == want
    pub.close()


def test_a_rank_killed_mid_upload_leaves_that_version_uncommitted_and_a_restart_continues(tiny_model_dir, tmp_path):
    b, dump = tmp_path / "b", tmp_path / "dump"
    dump.mkdir()
    common = ["--model", str(tiny_model_dir), "--bucket", str(b), "--anchor-every", "10", "--keep-anchors", "10",
              "--dump", str(dump)]
    rc, log = torchrun(tmp_path, "killed", *common, "--versions", "6", "--kill-rank", "1", "--kill-version", "3")
    assert rc != 0, "the run whose rank 1 was killed must fail"
    m = read_manifest(open_bucket(b))
    # Rank 0 may or may not have committed v2 before torchrun stopped it; v3 it can never have committed.
    last = m.latest
    assert 0 <= last < 3, f"v3 must never be committed (manifest at v{last})"
    torn = b / part_path(3, 1, 2, anchor=False)
    assert torn.is_file() and m.delta(3) is None  # the torn half-part is there, and nothing names it
    assert verify_bucket(str(b)).ok
    st: dict = {}
    assert Follower(b).sync_state(st, None) == last and same(st, reference(dump, last))

    rc, log = torchrun(tmp_path, "restarted", *common, "--versions", "3")
    assert rc == 0, log[-4000:]
    assert f"PUBLISHED {last + 1}..{last + 3}" in log
    m = read_manifest(open_bucket(b))
    assert m.latest == last + 3
    # The restart rebuilt each rank's rows of the last committed version from its own parts and proved them
    # against the digest: the next version is a delta on it.
    nxt = m.delta(last + 1)
    assert nxt is not None and nxt.base == last and len(nxt.parts) == 2
    replay_every_version(b, dump, range(last + 4))
    res = verify_bucket(str(b))
    assert res.ok, res.lines


def test_sharded_benchmark_runs_and_reports_per_rank_memory(tmp_path):
    """bench/sharded.py --quick: 1 process, 1 rank and 2 ranks on tiny shapes; the figures are there and consistent."""
    import json

    out = tmp_path / "sharded.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "sharded.py"), "--quick", "--versions", "3",
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    two = res["configs"]["ShardedPublisher x2"]["summary"]
    one = res["configs"]["single-process Publisher"]["summary"]
    assert two["ranks"] == 2 and two["elements_per_rank"] * 2 == one["elements_per_rank"]
    assert len(res["configs"]["ShardedPublisher x2"]["runs"]) == 2 and "ratio_sync_peak_2_ranks_vs_single" in res


# ------------------------------------------------------------------------------------- in one process (no torchrun)
def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(9, 4, generator=g), "b.bias": torch.randn(5, generator=g)}


def test_one_rank_without_torch_distributed_publishes_parts_and_refuses_nan(tmp_path):
    from shared.errors import NonFiniteWeightsError
    from shared.sharded import ShardedPublisher

    b = tmp_path / "b"
    pub = ShardedPublisher(b, run_id="one", lease_settle_s=0, anchor_every=3)
    w = _weights(0)
    for v in range(4):
        pub.publish(w, v)
        w = {k: t + 0.05 * torch.randn(t.shape) for k, t in w.items()}
    pub.flush()
    bad = dict(w, **{"b.bias": torch.full((5,), float("nan"))})
    with pytest.raises(NonFiniteWeightsError, match="rank 0"):
        pub.publish(bad, 9)
    with pytest.raises(ValueError, match="rank 0: nothing to publish"):
        pub.publish({}, 9)
    pub.close()
    m = read_manifest(open_bucket(b))
    assert m.latest == 3 and all(len(e.parts) == 1 for e in (*m.anchors, *m.deltas))
    assert not (b / part_path(9, 0, 1, anchor=False)).exists() and not (b / part_path(9, 0, 1, anchor=True)).exists()
    assert verify_bucket(str(b)).ok
    st: dict = {}
    assert Follower(b).sync_state(st, None) == 3 and st["a.weight"].shape == (9, 4)


def test_switching_between_one_process_and_ranks_continues_the_history(tmp_path):
    """A single-file history continued by a ShardedPublisher (it re-splits the single files into its rows, proves
    them against the digest, and its first version is a delta in parts), then continued again by the single-process
    Publisher (it rebuilds the whole model from the parts, so its next version is a delta too)."""
    from shared.sharded import ShardedPublisher

    b = tmp_path / "b"
    with Publisher(b, run_id="r", lease_settle_s=0) as pub:
        pub.publish(_weights(0), 0)
    sharded = ShardedPublisher(b, run_id="r", lease_settle_s=0)
    rows = sharded.restored_rows()
    assert rows is not None and all(torch.equal(rows[k], v.to(torch.bfloat16)) for k, v in _weights(0).items())
    sharded.publish(_weights(1), 1)
    sharded.close()
    m = read_manifest(open_bucket(b))
    assert m.delta(1) is not None and m.delta(1).base == 0 and len(m.delta(1).parts) == 1
    w2 = {k: v.clone() for k, v in _weights(1).items()}
    w2["a.weight"][3, 1] += 1.0  # a small step: stored as a delta whenever the rebuild worked
    with Publisher(b, run_id="r", lease_settle_s=0, anchor_fraction=100.0) as pub:
        pub.publish(w2, 2)
    m = read_manifest(open_bucket(b))
    assert m.delta(2) is not None and m.delta(2).base == 1 and m.delta(2).path is not None
    assert verify_bucket(str(b)).ok
    st: dict = {}
    assert Follower(b).sync_state(st, None) == 2
    assert all(torch.equal(st[k], v.to(torch.bfloat16)) for k, v in w2.items())


def test_a_history_in_two_parts_is_re_split_for_another_rank_count(sharded_run, tmp_path):
    """The 2-rank history (deltas and anchors in 2 parts) continued by one rank: it reads both parts of every
    version since the newest anchor, keeps its rows (here: all of them), proves them against the digest, and its
    first version is a delta on the last 2-part version."""
    import shutil

    from shared.sharded import ShardedPublisher

    b = tmp_path / "b"
    shutil.copytree(sharded_run / "b", b)
    want = reference(sharded_run / "dump", 5)
    pub = ShardedPublisher(b, run_id="resplit", take_over=True, lease_settle_s=0)
    rows = pub.restored_rows()
    assert rows is not None and same(rows, want)
    step = {k: v.clone() for k, v in want.items()}
    name = min(step)
    step[name].view(-1)[:7] += 1.0
    rep = pub.publish(step, 6).result(timeout=120)
    pub.close()
    m = read_manifest(open_bucket(b))
    assert m.delta(6) is not None and m.delta(6).base == 5 and len(m.delta(6).parts) == 1
    assert m.delta(6).changed <= 7
    # Rank 0's report describes the committed version as a whole (what the trainer's dashboard shows).
    assert rep.version_changed == m.delta(6).changed and rep.delta_bytes == m.delta(6).bytes
    assert rep.version_total == sum(t.numel() for t in want.values()) and rep.anchor_bytes is None
    st: dict = {}
    assert Follower(b).sync_state(st, None) == 6 and same(st, {k: v.to(torch.bfloat16) for k, v in step.items()})
    assert verify_bucket(str(b)).ok


def test_a_history_coded_against_its_whole_base_is_not_re_split(tmp_path):
    """ctx deltas decode only against the whole base tensor: another partition cannot apply them to its rows, so the
    restart says so and falls back to an anchor (rows unknown) instead of guessing."""
    from shared.formats import read_patch_file
    from shared.sharded import ShardedPublisher

    b = tmp_path / "b"
    w = {"a.weight": torch.randn(512, 512, generator=torch.Generator().manual_seed(3))}
    with Publisher(b, run_id="r", lease_settle_s=0, encoding="ctx", anchor_fraction=100.0) as pub:
        pub.publish(w, 0)
        w2 = {"a.weight": w["a.weight"].clone()}
        w2["a.weight"].view(-1)[::5] += 0.01
        pub.publish(w2, 1)
    m = read_manifest(open_bucket(b))
    stored = read_patch_file(b / m.delta(1).path)
    assert stored.tensors["a.weight"].needs_base_context  # the precondition: this delta is coded against its base
    pub = ShardedPublisher(b, run_id="r", lease_settle_s=0)
    assert pub.restored_rows() is None
    pub.publish(w2, 2)
    pub.close()
    m = read_manifest(open_bucket(b))
    assert m.anchor(2) is not None and verify_bucket(str(b)).ok


def test_a_bucket_owned_by_another_live_run_is_refused_by_name(tmp_path):
    from shared.errors import OwnerConflictError
    from shared.sharded import ShardedPublisher

    holder = Publisher(tmp_path / "b", run_id="other-run", lease_settle_s=0)
    with pytest.raises(OwnerConflictError, match="other-run"):
        ShardedPublisher(tmp_path / "b", run_id="sharded-run", lease_settle_s=0)
    holder.close()
