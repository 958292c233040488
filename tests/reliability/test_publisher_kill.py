"""A trainer killed (SIGKILL) in the middle of publishing never leaves a manifest that names a partial file, never
loses a committed version, and a restarted trainer continues from the bucket's latest version.

The publisher runs in a real child process (`publisher_child.py`) writing a local-folder bucket through the test-only
`faulty://` wrapper, which paces or stalls its writes so that each kill lands where it is aimed: halfway through an
anchor upload, a delta upload, the manifest write, or at random moments of a paced run. After every kill: every
manifest entry's file has the recorded size and sha256, the whole history replays (`verify_bucket`), the last version
the child reported committed is still the latest (or older than it) with the same digest, and the next child starts
at latest + 1. At the end `dws verify` (the CLI) passes and a fresh replica state is bit-exact with the last commit.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dws_testing import REPO
from shared.bucket import open_bucket
from shared.follower import Follower
from shared.manifest import read_manifest, sha256_file
from shared.verify import verify_bucket

HERE = Path(__file__).resolve().parent
DWS = str(Path(sys.executable).with_name("dws"))

# (where the kill lands, fault plan, the temp file the stalled write leaves behind)
AIMED = [
    ("inside an anchor upload", {"stall": {"path": "anchors/*", "after_bytes": 512 << 10, "nth": 2}}, "anchors"),
    ("inside a delta upload", {"stall": {"path": "deltas/*", "after_bytes": 4096, "nth": 2}}, "deltas"),
    ("inside the manifest write", {"stall": {"path": "manifest.json", "after_bytes": 200, "nth": 2}}, "."),
]
RANDOM_KILLS = 3


class Child:
    """One run of the trainer stand-in; stdout lines are collected as they come."""

    def __init__(self, bucket: Path, faults_file: Path, log: Path, count: int, events: Path | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), DWS_FAULTS_FILE=str(faults_file),
                   PYTHONUNBUFFERED="1", DWS_FAULTS_LOG=str(events or os.devnull))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "publisher_child.py"), f"faulty://{bucket}",
                                      str(count)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=open(log, "a"), text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_for(self, prefix: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            assert self.proc.poll() is None or any(x.startswith(prefix) for x in self.lines), \
                f"child exited ({self.proc.returncode}) before {prefix!r}: {self.lines}"
            time.sleep(0.01)
        raise AssertionError(f"child never printed {prefix!r}: {self.lines}")

    @property
    def start(self) -> int:
        return int(self.wait_for("START").split()[1])

    @property
    def committed(self) -> dict[int, str]:
        return {int(v): d for _, v, d in (line.split() for line in list(self.lines) if line.startswith("COMMITTED"))}

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self._reader.join(10)


@pytest.fixture
def children():
    """Every child started by a test is killed at its end, also when an assertion stopped the test early."""
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def temp_files(bucket: Path) -> set[Path]:
    return {p for p in bucket.rglob(".*.tmp")}


def audit(bucket: Path, committed: dict[int, str]) -> dict:
    """What a kill left behind, measured: entries whose file is partial or altered, committed versions lost."""
    m = read_manifest(open_bucket(bucket))
    bad_entries = []
    for e in (*m.anchors, *m.deltas):
        f = bucket / e.path
        if not f.is_file() or f.stat().st_size != e.bytes or sha256_file(f) != e.sha256:
            bad_entries.append(e.path)
    last = max(committed) if committed else None
    lost = []
    if last is not None:
        if m.latest < last:
            lost.append(f"latest v{m.latest} < committed v{last}")
        for v, digest in committed.items():
            kept = m.digest_of(v)
            if kept is not None and kept != digest:
                lost.append(f"v{v} digest changed")
        if m.digest_of(last) is None:
            lost.append(f"committed v{last} is not in the manifest")
    verify = verify_bucket(str(bucket))
    listed_temp = [e.path for e in open_bucket(bucket).list() if e.path.endswith(".tmp")]
    return {"latest": m.latest, "bad_entries": bad_entries, "lost": lost, "verify_ok": verify.ok,
            "verify": verify.lines[-1], "listed_temp": listed_temp}


def test_trainer_killed_mid_upload_leaves_a_consistent_bucket_and_restarts(tmp_path, figures, children):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    faults = tmp_path / "faults.json"
    log = tmp_path / "children.log"
    rnd = random.Random(10)
    results = []
    all_committed: dict[int, str] = {}
    expected_start = 0
    plans = [*AIMED, *[("at a random moment", {"slow_write_s_per_mib": 1.0}, None)] * RANDOM_KILLS]
    for where, plan, stalled_dir in plans:
        faults.write_text(json.dumps(plan))
        before = temp_files(bucket)
        events = tmp_path / f"events-{len(results)}.jsonl"
        child = Child(bucket, faults, log, count=30, events=events)
        children.append(child)
        start = child.start
        landed = None
        if stalled_dir is not None:
            deadline = time.time() + 120
            while time.time() < deadline and landed is None:
                stalls = [json.loads(x) for x in events.read_text().splitlines()] if events.exists() else []
                stalls = [e for e in stalls if e["op"] == "stall"]
                landed = stalls[-1] if stalls else None
                assert child.proc.poll() is None, f"child exited before the stall {plan}: {child.lines}"
                time.sleep(0.01)
            assert landed is not None, f"the stall {plan} was never reached: {child.lines}"
            assert Path(landed["temp"]).is_file() and Path(landed["temp"]).parent.name == \
                (bucket / stalled_dir).resolve().name
        else:
            time.sleep(rnd.uniform(0.2, 5.0))  # anywhere in the first versions of this run
        child.kill()
        mid_write = bool(temp_files(bucket) - before)
        committed = child.committed
        all_committed.update(committed)
        state = audit(bucket, all_committed)
        results.append({"where": where, "start": start, "expected_start": expected_start,
                        "committed_before_kill": sorted(committed), "inside_a_file_write": mid_write, **state})
        expected_start = state["latest"] + 1

    # The last restart runs to completion without faults and must continue the same history.
    faults.write_text("{}")
    final = Child(bucket, faults, log, count=3)
    children.append(final)
    final_start = final.start
    assert final.proc.wait(180) == 0, log.read_text()[-3000:]
    final._reader.join(10)
    all_committed.update(final.committed)
    end = audit(bucket, all_committed)
    cli = subprocess.run([DWS, "verify", str(bucket)], capture_output=True, text=True, timeout=300)
    version, state = Follower(bucket).materialize()
    from shared.digest import weights_digest

    figures["trainer_killed_during_upload"] = {
        "kills": len(results),
        "aimed_inside_upload_or_commit": len(AIMED),
        "kills_inside_a_file_write": sum(r["inside_a_file_write"] for r in results),
        "manifest_entries_partial_or_altered": sum(len(r["bad_entries"]) for r in results) + len(end["bad_entries"]),
        "committed_versions_lost": sum(len(r["lost"]) for r in results) + len(end["lost"]),
        "verify_failures": sum(not r["verify_ok"] for r in results) + (not end["verify_ok"]) + (cli.returncode != 0),
        "restarts_not_continuing_from_latest": sum(r["start"] != r["expected_start"] for r in results[1:])
                                               + (final_start != expected_start),
        "versions_committed": len(all_committed),
        "kills_detail": [{k: r[k] for k in ("where", "start", "committed_before_kill", "inside_a_file_write",
                                            "latest")} for r in results],
    }
    for r in results:
        assert r["bad_entries"] == [] and r["lost"] == [] and r["verify_ok"] and r["listed_temp"] == [], r
    for r in results[1:]:
        assert r["start"] == r["expected_start"], f"a restarted publisher must continue at latest + 1: {r}"
    assert results[0]["start"] == 0
    assert all(r["inside_a_file_write"] for r in results[:len(AIMED)]), "aimed kills must land inside a write"
    assert final_start == expected_start and end["bad_entries"] == [] and end["lost"] == [] and end["verify_ok"]
    assert cli.returncode == 0 and "OK" in cli.stdout, cli.stdout + cli.stderr
    assert version == max(all_committed) and weights_digest(state) == all_committed[version]
