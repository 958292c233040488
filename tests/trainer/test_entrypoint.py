"""The production entrypoint, `python -m trainer_space`, as the trainer image runs it (configuration from DWS_*
environment variables, like Space variables), against the suite's real env_space and rollout gateway; and the
NaN/Inf stop through the same `main()`.

The NaN run uses the fault-injection test hook `DWS_TEST_FAULT_NAN_AT_STEP` (an environment variable, not a user-facing
flag): it writes NaN into one weight after that optimizer step -- what a diverged update leaves -- and the publishing
path must refuse it.
A huge learning rate was considered and rejected as the trigger: AdamW either raises an overflow error (lr beyond
~3e38) or produces huge but finite weights that publish fine for a step, so it does not reliably reach NaN."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dws_testing import REPO, free_port, stop_process_group
from shared.verify import verify_bucket
from trainer_helpers import TOKEN, bucket_latest, sync_replica
from trainer_space.__main__ import main

pytestmark = pytest.mark.slow
STEPS = 3


def _space_env(services, port: int, **extra: str) -> dict[str, str]:
    return {"DWS_MODEL": str(services["model"]), "DWS_BUCKET": str(services["bucket"]),
            "DWS_ROLLOUT_URLS": services["gw"].url, "DWS_ENV_URL": services["env"].url,
            "DWS_ROLLOUT_TOKEN": TOKEN, "DWS_TASK": "short", "DWS_STEPS": str(STEPS), "DWS_LR": "0.01",
            "DWS_PROMPTS_PER_STEP": "4", "DWS_GROUP_SIZE": "8", "DWS_MAX_COMPLETION_LENGTH": "8",
            "DWS_OUTPUT_DIR": str(services["root"] / "out-entry"), "HOST": "127.0.0.1", "PORT": str(port), **extra}


def test_python_m_trainer_space(run1, services):
    latest = bucket_latest(services["bucket"])
    sync_replica(services["gw"], latest)
    port = free_port()
    log = services["root"] / "trainer-entry.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWS_")}
    env.update(_space_env(services, port), PYTHONUNBUFFERED="1")
    # No --exit-when-done: outside a Space (SPACE_ID unset) the command returns when training is done.
    env.pop("SPACE_ID", None)
    proc = subprocess.Popen([sys.executable, "-m", "trainer_space"], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[dict] = []
    try:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/status", timeout=30)
                if r.status_code == 200:
                    seen.append(r.json())
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        rc = proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        stop_process_group(proc, timeout=10)
    out = log.read_text(errors="replace")
    assert rc == 0, out[-4000:]
    # /status was served while the run was going on, with the run's own figures.
    training = [s for s in seen if s["phase"] == "training"]
    assert training, [s["phase"] for s in seen] or out[-3000:]
    assert all(s["config"]["rollout_token"] == "set" for s in seen)  # describe() never carries a secret
    assert TOKEN not in out
    assert max(s["training"]["step"] for s in seen) >= 1
    # Every version of the run is in the bucket, the chain replays bit-exact, and it was published by this process.
    m_latest = bucket_latest(services["bucket"])
    assert m_latest == latest + STEPS
    for v in range(latest + 1, latest + STEPS + 1):
        assert f"published v{v} " in out, v
    res = verify_bucket(str(services["bucket"]))
    assert res.ok, res.lines


def _bucket_files(bucket: Path) -> dict[str, bytes]:
    # owner.json is the publisher's lease record (heartbeats), not published weights
    return {str(p.relative_to(bucket)): p.read_bytes() for p in sorted(bucket.rglob("*"))
            if p.is_file() and p.name != "owner.json"}


def test_nan_weights_stop_the_run_and_publish_nothing(run1, services, monkeypatch):
    latest = bucket_latest(services["bucket"])
    sync_replica(services["gw"], latest)
    before = _bucket_files(services["bucket"])
    manifest_before = json.loads(before["manifest.json"])
    for k in [k for k in os.environ if k.startswith("DWS_") or k == "SPACE_ID"]:
        monkeypatch.delenv(k)
    for k, v in _space_env(services, free_port(), DWS_TEST_FAULT_NAN_AT_STEP="1", DWS_UI="false").items():
        monkeypatch.setenv(k, v)
    rc = main([])
    assert rc == 2
    after = _bucket_files(services["bucket"])
    assert after == before, sorted(set(after) ^ set(before))  # not one byte written: no file, no manifest
    assert json.loads(after["manifest.json"])["latest"] == manifest_before["latest"] == latest
