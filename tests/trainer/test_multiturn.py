"""Multi-turn Wordle through OpenEnv's own client against the suite's real env_space and rollout gateway.

The tiny model cannot learn Wordle; what is checked is that episodes are really played (sessions on the env Space,
several turns each, every turn generated on the replica), that the reward GRPO trains on is the env's episode return,
and that the token layout handed to TRL is consistent (model tokens trained, env feedback masked out)."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from trainer_helpers import TOKEN, bucket_latest, cfg_for, sync_replica
from trainer_space.grpo import train
from trainer_space.remote import ReplicaPool
from trainer_space.rollouts import BatchProducer
from trainer_space.state import RunState

pytestmark = pytest.mark.slow
MAX_TURNS = 3


def _wordle_stats(env) -> dict:
    return httpx.get(f"{env.url}/status", timeout=30).json()["metrics"]["tasks"]["wordle"]


def test_episode_token_layout(services):
    """One batch of two episodes straight from the producer: ids, logprobs and env_mask line up, turns alternate
    model tokens (mask 1) with env feedback rendered by the chat template (mask 0)."""
    tok = AutoTokenizer.from_pretrained(services["model"])
    pool = ReplicaPool([services["gw"].url], token=TOKEN)
    producer = BatchProducer(pool=pool, tokenizer=tok, env_url=services["env"].url, env_token=None,
                             multi_turn={"wordle"}, group_size=2, max_tokens=8, temperature=1.0, max_turns=MAX_TURNS,
                             max_episode_tokens=600, task_max_turns={"wordle": 6})
    try:
        batch = producer.produce([{"task": "wordle", "prompt_id": "wordle:0007", "prompt": "(from the env)"}] * 2)
    finally:
        producer.close()
        pool.close()
    assert len(batch.samples) == 2
    for s in batch.samples:
        assert len(s.completion_ids) == len(s.logprobs) == len(s.env_mask)
        assert s.env_return is not None and 1 <= s.turns <= MAX_TURNS and len(s.versions) == s.turns
        assert "Wordle" in tok.decode(s.prompt_ids)  # the prompt is the env session's own observation
        # runs of equal mask values: model, env, model, env, ..., model
        runs = [s.env_mask[0]]
        for a, b in zip(s.env_mask, s.env_mask[1:]):
            if a != b:
                runs.append(b)
        assert runs == [1, 0] * (s.turns - 1) + [1], runs
        env_text = tok.decode([t for t, m in zip(s.completion_ids, s.env_mask) if m == 0])
        if s.turns > 1:
            assert "user" in env_text and "assistant" in env_text  # the template's turn markers, not the model's
        assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.env_mask) if m == 0)
        assert all(lp <= 0.0 for lp in s.logprobs)


def test_wordle_training_steps_play_real_episodes(run1, services):
    before = _wordle_stats(services["env"])
    latest = bucket_latest(services["bucket"])
    sync_replica(services["gw"], latest)
    state = RunState()
    run = train(cfg_for(services, task="wordle", steps=2, prompts_per_step=2, group_size=4, max_turns=MAX_TURNS,
                        max_episode_tokens=600), state=state)
    assert run.final_version == latest + 2 and bucket_latest(services["bucket"]) == latest + 2
    snap = state.snapshot()
    ep = snap["episodes"]
    assert ep["episodes"] == 2 * 2 * 4, ep
    assert ep["turns_max"] > 1 and ep["multi_turn_episodes"] > 0, ep
    assert snap["multi_turn_tasks"] == ["wordle"]
    for b in snap["batches"]:
        assert len(b["turns"]) == 8 and b["lag"] <= 1
    # The reward GRPO used is the env's episode return, row by row.
    for row, b in zip(snap["steps"], snap["batches"], strict=True):
        assert row["reward_mean"] == pytest.approx(sum(b["episode_returns"]) / len(b["episode_returns"]), abs=1e-3)
        assert row["reward_by_task"].keys() == {"wordle"}
    # The env Space scored exactly the turns the trainer says it played, on its own WebSocket sessions.
    after = _wordle_stats(services["env"])
    assert after["rewards"] - before["rewards"] == ep["turns_total"]
