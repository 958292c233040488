"""Multi-turn Wordle through OpenEnv's own client against the suite's real env_space and rollout gateway.

The tiny model cannot learn Wordle; what is checked is that episodes are really played (sessions on the env Space,
several turns each, every turn generated on the replica), that the reward GRPO trains on is the env's episode return,
and that the token layout handed to TRL is consistent (model tokens trained, env feedback masked out)."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from trainer_helpers import TOKEN, bucket_latest, cfg_for, sync_replica
from trainer_space.remote import EnvPool, ReplicaPool
from trainer_space.rollouts import GroupPlayer, TurnTemplate, to_rollout_samples
from trainer_space.state import RunState
from trainer_space.train import train
from trainer_space.worker import make_executor

pytestmark = pytest.mark.slow
MAX_TURNS = 3


def _wordle_stats(env) -> dict:
    return httpx.get(f"{env.url}/status", timeout=30).json()["metrics"]["tasks"]["wordle"]


def test_episode_token_layout(services):
    """One group of two episodes straight from the player: ids, logprobs and masks line up, turns alternate model
    tokens (mask 1) with env feedback rendered by the chat template (mask 0), and the TRL samples keep that mask."""
    tok = AutoTokenizer.from_pretrained(services["model"])
    pool = ReplicaPool([services["gw"].url], token=TOKEN)
    envs = EnvPool([services["env"].url], token=None, timeout_s=60, retry_after_s=2)
    player = GroupPlayer(pool=pool, envs=envs, template=TurnTemplate(tok), executor=make_executor(1, 2),
                         env_token=None, group_size=2, max_tokens=8, temperature=1.0, multi_turn={"wordle"},
                         task_max_turns={"wordle": 6}, max_turns=MAX_TURNS, max_episode_tokens=600)
    try:
        group = player.play({"task": "wordle", "prompt_id": "wordle:0007", "prompt": "(from the env)"})
    finally:
        pool.close()
        envs.close()
    assert len(group.samples) == 2 and group.multi_turn
    for s in group.samples:
        assert len(s.completion_ids) == len(s.logprobs) == len(s.env_mask)
        assert s.reward is not None and 1 <= s.turns <= MAX_TURNS and len(s.versions) == s.turns
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
    for smp, s in zip(to_rollout_samples(group, 0), group.samples):
        assert smp.completion_mask.tolist() == [0] * len(s.prompt_ids) + s.env_mask  # env tokens: no loss
        assert smp.metrics["episode/turns"] == s.turns and smp.metrics["rewards/wordle"] == s.reward


def test_wordle_training_steps_play_real_episodes(run1, services):
    before = _wordle_stats(services["env"])
    latest = bucket_latest(services["bucket"])
    sync_replica(services["gw"], latest)
    state = RunState()
    run = train(cfg_for(services, task="wordle", steps=2, prompts_per_step=2, group_size=4, max_turns=MAX_TURNS,
                        max_episode_tokens=600), state=state)
    assert run.final_version == latest + 2 and bucket_latest(services["bucket"]) == latest + 2
    snap = state.snapshot()
    assert snap["multi_turn_tasks"] == ["wordle"]
    ro = snap["rollouts"]
    # Continuous generation plays episodes beyond the 2 x 8 trained on; every one of them was scored by the env.
    assert len(ro["turns"]) >= 2 * 2 * 4 and max(ro["turns"]) > 1, ro
    for row in snap["steps"]:
        assert row["reward_by_task"].keys() == {"wordle"} and row["turns_mean"] >= 1
    # The env Space scored exactly the turns the trainer says it played, on its own WebSocket sessions (episodes
    # still in flight when the run stopped may add a few turns afterwards: compare with what was complete).
    after = _wordle_stats(services["env"])
    assert after["rewards"] - before["rewards"] >= sum(ro["turns"])
