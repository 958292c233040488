"""The remote rollout worker against the suite's real gateway and env_space (no trainer): the TRL samples it makes
(layout, version tags, logprobs, group-normalised advantages), continuous production into a bounded queue, and
`check_health` raising when no replica or no env Space answers (a closed port: a real peer that is down)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from dws_testing import free_port
from trainer_helpers import TOKEN, bucket_latest, sync_replica
from trainer_space.remote import EnvPool, ReplicaPool
from trainer_space.rollouts import GroupPlayer, TurnTemplate, advantages, to_rollout_samples
from trainer_space.worker import RemoteRolloutWorker, make_executor

pytestmark = pytest.mark.slow


def _player(services, *, replicas=None, envs=None, group_size=4):
    tok = AutoTokenizer.from_pretrained(services["model"])
    pool = ReplicaPool(replicas or [services["gw"].url], token=TOKEN, retry_after_s=1.0)
    env = EnvPool(envs or [services["env"].url], token=None, timeout_s=30, retry_after_s=1.0)
    return GroupPlayer(pool=pool, envs=env, template=TurnTemplate(tok), executor=make_executor(2, group_size),
                       env_token=None, group_size=group_size, max_tokens=8, temperature=1.0, multi_turn=set(),
                       task_max_turns={"short": 1})


def _rows(envs: EnvPool, n=4):
    return [{"prompt": p.prompt, "prompt_id": p.prompt_id, "task": "short"} for p in envs.prompts("short", n=n)]


def test_group_becomes_trl_samples(run1, services):
    served = sync_replica(services["gw"], bucket_latest(services["bucket"]))["served_version"]
    player = _player(services)
    try:
        row = _rows(player.envs, 1)[0]
        group = player.play(row)
        samples = to_rollout_samples(group, group_id=7)
    finally:
        player.pool.close()
        player.envs.close()
    assert len(samples) == 4 and group.version == served
    rewards = [s.reward for s in group.samples]
    assert [x.advantage for x in samples] == pytest.approx(advantages(rewards))
    if len(set(rewards)) > 1:
        assert abs(sum(x.advantage for x in samples)) < 1e-6 and np.std([x.advantage for x in samples]) == \
            pytest.approx(1.0, abs=1e-6)
    for smp, s in zip(samples, group.samples):
        n_prompt = len(s.prompt_ids)
        assert smp.model_version == served and smp.group_id == 7
        assert smp.input_ids.tolist() == s.prompt_ids + s.completion_ids
        assert smp.completion_mask.tolist() == [0] * n_prompt + [1] * len(s.completion_ids)
        # the replica's own per-token logprobs, at the completion positions
        assert smp.old_log_probs[n_prompt:].tolist() == pytest.approx(s.logprobs)
        assert all(lp <= 0 for lp in s.logprobs) and smp.old_log_probs[:n_prompt].tolist() == [0.0] * n_prompt
        assert smp.metrics["reward"] == s.reward and smp.metrics["rewards/short"] == s.reward


def test_worker_fills_a_bounded_queue_continuously(run1, services):
    player = _player(services)
    w = RemoteRolloutWorker(player=player, rows=_rows(player.envs), max_inflight=2, queue_size=6, max_staleness=1)
    w.update_model_version(bucket_latest(services["bucket"]))
    try:
        w.start()
        deadline = time.time() + 120
        while w.rollout_buffer.qsize() < 6 and time.time() < deadline:
            w.check_health(60)
            time.sleep(0.2)
        assert w.rollout_buffer.full()  # producers now wait: generation never runs unboundedly ahead
        time.sleep(1.0)
        assert w.rollout_buffer.full() and w.snapshot()["groups"] >= 2
        taken = [w.rollout_buffer.get() for _ in range(6)]
        assert all(s.model_version >= 0 for s in taken)
        deadline = time.time() + 120
        while w.rollout_buffer.qsize() < 2 and time.time() < deadline:  # freed room is filled again
            time.sleep(0.2)
        assert w.rollout_buffer.qsize() >= 2
        assert w.snapshot()["backpressure_s"] > 0.5  # the producers that waited on the full queue said so
    finally:
        w.stop()
        player.pool.close()
        player.envs.close()


@pytest.mark.parametrize("down", ["replica", "env"])
def test_check_health_raises_when_no_peer_answers(run1, services, down):
    dead = f"http://127.0.0.1:{free_port()}"
    player = _player(services, replicas=[dead] if down == "replica" else None,
                     envs=[dead] if down == "env" else None)
    rows = [{"prompt": "Say hi", "prompt_id": "short:0000", "task": "short"}]
    w = RemoteRolloutWorker(player=player, rows=rows, max_inflight=1, queue_size=4, max_staleness=1000,
                            fresh_wait_s=0)
    try:
        w.start()
        deadline = time.time() + 60
        err = None
        while err is None and time.time() < deadline:
            time.sleep(0.5)
            try:
                w.check_health(1.0)
            except RuntimeError as e:
                err = str(e)
        assert err is not None, w.snapshot()
        what = "rollout replica" if down == "replica" else "env Space"
        assert f"no {what} has answered" in err and dead in err, err
    finally:
        w.stop()
        player.pool.close()
        player.envs.close()
