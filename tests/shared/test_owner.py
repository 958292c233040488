"""One writer per bucket: the publisher's `owner.json` lease (shared/lease.py `BucketLease`).

A second trainer pointed at a bucket by mistake must refuse with an error naming the owner instead of interleaving
versions; `take_over` hands the bucket to the new one and stops the old one before it writes again; a restarted
trainer of the same run, or any trainer once the owner's lease expired or was released, continues the history.
Local-folder buckets, real Publisher objects, and at the end real processes killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import shared.lease as lease_mod
from shared.bucket import open_bucket
from shared.errors import FormatError, OwnerConflictError, PublishError
from shared.follower import Follower
from shared.manifest import delta_path, read_manifest
from shared.lease import OWNER_PATH
from shared.publisher import Publisher
from shared.verify import verify_bucket


def weights(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + version)
    return {"layer.weight": torch.randn(32, 16, generator=g), "layer.bias": torch.randn(16, generator=g)}


def owner(bucket_dir) -> dict:
    return json.loads((bucket_dir / OWNER_PATH).read_text())


def latest(bucket_dir) -> int:
    return read_manifest(open_bucket(bucket_dir)).latest


def publish(pub: Publisher, version: int) -> None:
    pub.publish(weights(version), version)
    pub.flush()


def test_second_publisher_refuses_and_names_the_owner(tmp_path):
    b = tmp_path / "b"
    a = Publisher(b, run_id="run-a", lease_settle_s=0)
    publish(a, 0)
    manifest_before = (b / "manifest.json").read_bytes()
    with pytest.raises(OwnerConflictError) as info:
        Publisher(b, run_id="run-b", lease_settle_s=0)
    msg = str(info.value)
    assert "run 'run-a'" in msg and f"pid {os.getpid()}" in msg and "--take-over" in msg, msg
    assert (b / "manifest.json").read_bytes() == manifest_before, "a refused publisher writes nothing"
    assert owner(b)["run_id"] == "run-a"
    publish(a, 1)  # the owner carries on undisturbed
    assert latest(b) == 1
    assert read_manifest(open_bucket(b)).owner.startswith("run-a ")
    a.close()


def test_take_over_stops_the_old_owner_before_it_writes(tmp_path):
    b = tmp_path / "b"
    a = Publisher(b, run_id="run-a", lease_settle_s=0)
    publish(a, 0)
    new = Publisher(b, run_id="run-b", take_over=True, lease_settle_s=0)
    assert new.latest_version == 0
    publish(new, 1)
    a.publish(weights(2), 2)
    with pytest.raises(OwnerConflictError, match="taken over by run 'run-b'"):
        a.flush()
    assert not (b / delta_path(2)).exists() and not (b / "anchors/v00000002.safetensors").exists(), \
        "the old owner must stop before uploading"
    assert latest(b) == 1 and owner(b)["run_id"] == "run-b"
    with pytest.raises(OwnerConflictError):  # and it stays stopped
        a.publish(weights(3), 3)
    publish(new, 2)
    assert verify_bucket(str(b)).ok
    new.close()


def test_expired_lease_is_taken_over_without_force(tmp_path):
    b = tmp_path / "b"
    a = Publisher(b, run_id="run-a", lease_ttl_s=0.6, lease_settle_s=0)
    publish(a, 0)
    a._lease._stop.set()  # the owner hangs: its heartbeats stop, as if the process were frozen
    with pytest.raises(OwnerConflictError, match="run 'run-a'"):
        Publisher(b, run_id="run-b", lease_settle_s=0)
    time.sleep(0.8)
    c = Publisher(b, run_id="run-b", lease_settle_s=0)
    publish(c, 1)
    assert latest(b) == 1
    with pytest.raises(OwnerConflictError, match="run-b"):
        publish(a, 2)  # the frozen owner wakes up: it must not write over the new one


def test_clean_close_releases_the_bucket(tmp_path):
    b = tmp_path / "b"
    with Publisher(b, run_id="run-a", lease_settle_s=0) as a:
        publish(a, 0)
    assert owner(b)["released"] is True
    with Publisher(b, run_id="run-b", lease_settle_s=0) as c:  # no TTL to wait for
        publish(c, 1)
    assert latest(b) == 1


def test_restart_with_the_same_run_id_continues(tmp_path, monkeypatch):
    b = tmp_path / "b"
    a = Publisher(b, run_id="run-a", lease_settle_s=0)
    publish(a, 0)
    monkeypatch.setattr(lease_mod, "_CLAIMANT", "another-process")  # what a restarted process looks like
    a2 = Publisher(b, run_id="run-a", lease_settle_s=0)
    publish(a2, 1)
    assert owner(b)["claimant"] == "another-process"
    monkeypatch.undo()
    with pytest.raises(OwnerConflictError, match="taken over"):
        publish(a, 2)  # the pre-restart process, if it still lives, is stopped


def test_default_run_id_is_shared_within_a_process(tmp_path, monkeypatch):
    """A trainer restarting in place (same process, no run id given) continues; DWS_RUN_ID / SPACE_ID name runs."""
    monkeypatch.delenv("DWS_RUN_ID", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    b = tmp_path / "b"
    a = Publisher(b, lease_settle_s=0)
    publish(a, 0)
    a2 = Publisher(b, lease_settle_s=0)
    publish(a2, 1)
    assert latest(b) == 1
    monkeypatch.setenv("SPACE_ID", "alice/trainer")
    assert lease_mod.default_run_id() == "alice/trainer"
    monkeypatch.setenv("DWS_RUN_ID", "exp-7")
    assert lease_mod.default_run_id() == "exp-7"


def test_simultaneous_claims_leave_exactly_one_owner(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    results: dict[str, object] = {}
    start = threading.Barrier(4)

    def claim(run: str) -> None:
        start.wait()
        try:
            results[run] = Publisher(b, run_id=run, lease_settle_s=0.3)
        except OwnerConflictError as exc:
            results[run] = exc

    threads = [threading.Thread(target=claim, args=(f"run-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, v in results.items() if isinstance(v, Publisher)]
    assert len(winners) == 1, results
    assert owner(b)["run_id"] == winners[0]
    publish(results[winners[0]], 0)


def test_unreadable_owner_record_is_refused_unless_taken_over(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    (b / OWNER_PATH).write_text("{not json")
    with pytest.raises(FormatError, match="not a dws owner record"):
        Publisher(b, run_id="run-a", lease_settle_s=0)
    pub = Publisher(b, run_id="run-a", take_over=True, lease_settle_s=0)
    publish(pub, 0)
    assert owner(b)["run_id"] == "run-a"


def test_lost_lease_is_a_publish_error_for_existing_handlers(tmp_path):
    assert issubclass(OwnerConflictError, PublishError)


# ------------------------------------------------------------------------------------------- real processes
CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from test_owner import weights
from shared.errors import DwsError
from shared.publisher import Publisher

bucket, run_id, take_over = sys.argv[2], sys.argv[3], sys.argv[4] == "1"
ttl, first = float(sys.argv[5]), int(sys.argv[6])
try:
    pub = Publisher(bucket, run_id=run_id, take_over=take_over, lease_ttl_s=ttl)
    pub.publish(weights(first), first)
    pub.flush()
except DwsError as exc:
    print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
    sys.exit(3)
print(f"PUBLISHED {first}", flush=True)
for line in sys.stdin:  # "publish N" or "close"; the test may also SIGKILL us while we wait here
    cmd, *arg = line.split()
    if cmd == "close":
        pub.close()
        sys.exit(0)
    try:
        pub.publish(weights(int(arg[0])), int(arg[0]))
        pub.flush()
    except DwsError as exc:
        print(f"REFUSED {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print(f"PUBLISHED {arg[0]}", flush=True)
"""


TTL = 12.0  # above a child's start-up on an idle machine; the expiry itself is set through the record below


class Child:
    """A publisher in its own process (a trainer), driven line by line over stdin."""

    def __init__(self, bucket, run_id: str, version: int, *, take_over=False, ttl=TTL):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, os.path.dirname(__file__), str(bucket), run_id, "1" if take_over else "0",
             str(ttl), str(version)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first = self.proc.stdout.readline().strip()

    def send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self) -> int:
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        return self.proc.wait(60)


def test_two_real_trainer_processes(tmp_path):
    b = tmp_path / "b"
    a = Child(b, "run-a", 0)
    assert a.first == "PUBLISHED 0", a.proc.stderr.read() if a.proc.poll() is not None else a.first

    second = Child(b, "run-b", 1)
    assert second.first.startswith("REFUSED OwnerConflictError") and "run 'run-a'" in second.first, second.first
    assert f"pid {a.proc.pid}" in second.first and second.finish() == 3
    assert latest(b) == 0

    taker = Child(b, "run-b", 1, take_over=True)
    assert taker.first == "PUBLISHED 1", taker.first
    reply = a.send("publish 2")
    assert reply.startswith("REFUSED OwnerConflictError") and "taken over by run 'run-b'" in reply, reply
    assert a.finish() == 3
    assert latest(b) == 1 and not (b / delta_path(2)).exists()

    taker.kill()  # no release: its lease must expire before a third run may write
    # The lease's age is set through its record rather than waited for, so that a child's start-up time (tens of
    # seconds on a loaded machine) can never decide whether the killed owner's lease still looks fresh.
    rec = owner(b)
    (b / OWNER_PATH).write_text(json.dumps({**rec, "heartbeat": time.time() + 3600}))  # fresh for an hour
    third = Child(b, "run-c", 2)
    assert third.first.startswith("REFUSED") and "run 'run-b'" in third.first, third.first
    third.finish()
    (b / OWNER_PATH).write_text(json.dumps({**rec, "heartbeat": time.time() - rec["ttl_s"] - 1}))  # expired
    third = Child(b, "run-c", 2)
    assert third.first == "PUBLISHED 2", third.first

    third.kill()  # a crashed trainer restarted with the same run id continues at once
    restarted = Child(b, "run-c", 3)
    assert restarted.first == "PUBLISHED 3", restarted.first
    assert restarted.send("close") == "" and restarted.finish() == 0
    assert owner(b)["released"] is True

    m = read_manifest(open_bucket(b))
    assert m.latest == 3 and verify_bucket(str(b)).ok
    version, state = Follower(b).materialize()
    assert version == 3 and all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in weights(3).items())
