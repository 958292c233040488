"""End-to-end: the three Spaces as separate processes, with their production commands, over a local-folder bucket.

The module runs `python -m dws_tools.demo` (what `make demo` runs) once: env_space, rollout replica 1 (real vLLM on CPU)
and the trainer (TRL's AsyncGRPOTrainer) start from their own venvs; at v12 the trainer is stopped, replica 2 joins
(it must catch up from an anchor plus deltas), and the trainer restarts on the bucket and trains 30 more versions
while both replicas serve; a background client keeps sending completions to every replica while it syncs. The demo
writes a JSON report of what each service measured (artifacts/e2e-report.json, quoted by the README). The tests then
check the claims against independent sources: the trainer's own per-version digests, the bucket's manifest read here,
a Follower replaying the bucket here, and the `dws verify` command.

Failure paths of the orchestrator (port taken, hf:// without a token, Ctrl-C while vLLM starts) are checked without
training, and every one of them must leave no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dws_testing import REPO

PY = sys.executable  # the trainer venv: the orchestrator runs there (make demo does the same)
STEPS = 42  # v40 is an anchor (every 5), so a replica catching up at the end replays v41, v42 as deltas
LATE_AFTER = 12
REPORT = REPO / "artifacts" / "e2e-report.json"

pytestmark = pytest.mark.timeout(1800)


def _leftovers(work) -> list[str]:
    """Live processes started for the run in `work`: the demo gives every child DWS_DEMO_DIR=<work>, which vLLM's
    engine core and workers inherit (their process titles change, their environment does not)."""
    marker = f"DWS_DEMO_DIR={Path(work).resolve()}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out.append(f"{d.name}: {cmd[:160]}")
    return out


def _wait_no_leftovers(work, timeout: float = 30) -> list[str]:
    deadline = time.time() + timeout
    while (left := _leftovers(work)) and time.time() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cmd = [PY, "-u", "-m", "dws_tools.demo", "--dir", str(work), "--steps", str(STEPS), "--replicas", "2",
           "--late-after", str(LATE_AFTER), "--port-base", "0", "--exit-when-done", "--report", str(REPORT)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1700)
    print(proc.stdout[-6000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    report = json.loads(REPORT.read_text()) if REPORT.exists() and REPORT.stat().st_mtime > t0 else None
    return {"proc": proc, "report": report, "dir": work, "bucket": work / "bucket"}


def test_demo_exits_cleanly_and_reports(run):
    p = run["proc"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert run["report"] is not None, "no report written"
    assert "summary" in p.stdout and "dws verify" in p.stdout
    assert run["report"]["steps"] == STEPS and run["report"]["final_version"] == STEPS
    assert not _wait_no_leftovers(run["dir"]), "processes of the run are still alive"


def _manifest(bucket: Path):
    from shared.bucket import open_bucket
    from shared.manifest import read_manifest

    return read_manifest(open_bucket(str(bucket)))


def test_every_version_served_bit_exact_by_both_replicas(run):
    rep = run["report"]
    trainer = {v["version"]: v["digest"] for v in rep["versions"]}
    assert sorted(trainer) == list(range(STEPS + 1)), "the trainer did not publish every step"
    m = _manifest(run["bucket"])
    kept = {e.version: e.digest for e in [*m.anchors, *m.deltas]}
    assert kept and all(trainer[v] == d for v, d in kept.items()), "manifest digests differ from the trainer's"
    anchors = {v["version"] for v in rep["versions"] if "anchor" in v["kinds"]}
    replicas = {r["name"]: r for r in rep["replicas"]}
    assert set(replicas) == {"rollout-1", "rollout-2"}
    for name, r in replicas.items():
        verified = {int(v): d for v, d in r["verified_digests"].items()}
        first = min(verified)
        # Every version the replica served, from the one it started at up to the last, was hashed on the replica and
        # equals the trainer's. The trainer does not wait for replicas (generation is asynchronous): a replica that
        # finds two new versions at once applies both deltas in one sync and hashes the result, so a version in
        # between may never be served -- the next digest covers it, and the report lists it.
        assert max(verified) == STEPS and len(verified) >= (STEPS + 1 - first) // 2, f"{name}: {sorted(verified)}"
        assert sorted(set(range(first, STEPS + 1)) - set(verified)) == r["versions_passed_within_a_sync"]
        wrong = {v: d for v, d in verified.items() if d != trainer[v]}
        assert not wrong, f"{name} served versions whose digest differs from the trainer's: {wrong}"
        assert r["served_version"] == STEPS and r["served_digest"] == trainer[STEPS]
    assert min(int(v) for v in replicas["rollout-1"]["verified_digests"]) == 0  # started from the base model = v0
    late = replicas["rollout-2"]
    first_late = min(int(v) for v in late["verified_digests"])
    assert late["started_at_version"] == LATE_AFTER
    # The late join is real: the replica served while training ran and followed every version published after it
    # joined (v13..v42; at least 10 of them served, each hashed on the replica equal to the trainer's digest).
    assert late["ready_at_version"] == LATE_AFTER
    assert late["versions_followed_after_join"] >= 10, late
    assert late["gateway_requests"] > late["load_requests_ok"] > 0, late  # the trainer's requests, not only the load
    # Catch-up from an anchor plus deltas: its first sync loaded an anchor (never v0, long retired) and the deltas
    # after it, and v12 is the first version it served.
    assert first_late == LATE_AFTER, first_late
    m = re.search(r"anchor v(\d+) \+ (\d+) delta", late["join_sync_plan"] or "")
    assert m and int(m[1]) in anchors and 0 < int(m[1]) <= LATE_AFTER and int(m[2]) >= 1, late["join_sync_plan"]
    assert 0 not in kept, "v0 should have been retired, forcing the late replica onto an anchor"


def test_zero_failed_inference_requests(run):
    for r in run["report"]["replicas"]:
        assert r["gateway_failed_requests"] == 0, r
        assert r["load_requests_failed"] == 0, r["load_errors"]
        assert r["load_requests_ok"] > 0, f"{r['name']} got no inference load"
        assert r["syncs"] >= 1 and r["sync_failures"] == 0, r
    # replica 1 served inference while it applied versions (the load client saw several versions)
    assert run["report"]["replicas"][0]["load_versions_seen"] >= 3


def test_rollouts_within_the_staleness_bound(run):
    ro = run["report"]["rollouts"]
    assert ro["samples_produced"] > 0 and ro["staleness_max"] is not None and ro["staleness_max"] <= 1, ro


def test_reward_improves_on_learnable_task(run):
    rw = run["report"]["reward"]
    assert rw["first"] is not None and rw["last"] is not None
    assert rw["last"] > rw["first"] + 0.1, rw


def test_every_delta_smaller_than_a_tenth_of_an_anchor(run):
    rep = run["report"]
    anchor_sizes = [v["anchor_bytes"] for v in rep["versions"] if v["anchor_bytes"]]
    deltas = [v for v in rep["versions"] if v["delta_bytes"]]
    assert len(deltas) == STEPS
    too_big = [(v["version"], v["delta_bytes"]) for v in deltas if v["delta_bytes"] * 10 >= min(anchor_sizes)]
    assert not too_big, f"deltas of at least 1/10 of an anchor ({min(anchor_sizes)} B): {too_big}"
    # ...and the files really in the bucket agree with what the trainer reported
    m = _manifest(run["bucket"])
    for e in m.deltas:
        assert (run["bucket"] / e.path).stat().st_size * 10 < min(a.bytes for a in m.anchors)


def test_dws_verify_passes_and_a_follower_rebuilds_what_replicas_serve(run):
    dws = Path(PY).parent / "dws"
    out = subprocess.run([str(dws), "verify", str(run["bucket"])], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    from shared.digest import weights_digest
    from shared.follower import Follower

    version, state = Follower(str(run["bucket"])).materialize()
    assert version == STEPS
    d = weights_digest(state)
    assert all(r["served_digest"] == d for r in run["report"]["replicas"])


# ---------------------------------------------------------------------------------------------- failure paths
def _demo(args: list[str], work: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([PY, "-u", "-m", "dws_tools.demo", "--dir", str(work), "--exit-when-done", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_port_taken_is_a_clear_error_and_starts_nothing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _demo(["--port-base", str(port - 1)], tmp_path)  # env = base + 1 = the taken port
        out, _ = p.communicate(timeout=120)
    assert p.returncode == 1, out
    assert str(port) in out and "taken" in out and "Traceback" not in out
    assert not (tmp_path / "logs").exists(), "a service was started although a port was taken"


def test_hub_bucket_without_token_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    p = _demo(["--bucket", "hf://buckets/someone/run", "--port-base", "0"], tmp_path, env=env)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1 and "HF_TOKEN" in out and "Traceback" not in out, out
    assert not (tmp_path / "logs").exists()


def test_ctrl_c_while_vllm_starts_stops_every_process(tmp_path):
    p = _demo(["--port-base", "0", "--steps", "3", "--replicas", "1"], tmp_path, start_new_session=True)
    deadline = time.time() + 300
    log = tmp_path / "logs" / "rollout-1-vllm.log"
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.5)
    assert log.exists(), "vLLM never started"
    time.sleep(3)  # inside vLLM's start-up: engine core and workers being spawned
    assert _leftovers(tmp_path), "nothing was running"
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group gets SIGINT
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out, out
    left = _wait_no_leftovers(tmp_path)
    assert not left, left
