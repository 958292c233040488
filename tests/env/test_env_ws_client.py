"""WebSocket sessions on a real server, driven by OpenEnv's own EnvClient (our thin `DwsEnvClient` subclass)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from env_helpers import WordlePlayer

from env_space import tasks
from env_space.client import DwsEnvClient
from trainer_space.remote import EnvPool
from env_space.models import TaskState, TextAction
from env_space.tasks.wordle import WordleObservation, WordleState


def active_sessions(server) -> int:
    return httpx.get(f"{server.url}/status", headers=server.headers).json()["sessions"]["active"]


def wait_for_sessions(server, expected: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while active_sessions(server) != expected:
        assert time.monotonic() < deadline, f"sessions never reached {expected}"
        time.sleep(0.05)


def test_sync_client_plays_wordle_to_the_end(main_server):
    player = WordlePlayer(seed=1)
    with DwsEnvClient(base_url=main_server.url).sync() as env:
        result = env.reset(task="wordle", seed=42)
        obs = result.observation
        assert isinstance(obs, WordleObservation) and obs.turn == 0 and not result.done
        total = 0.0
        while not result.done:
            guess = player.guess(obs.guesses, obs.marks)
            result = env.step(TextAction(text=f"My guess: [{guess}]"))
            obs = result.observation
            total += result.reward
            assert obs.last_guess == guess and obs.last_valid
        state = env.state()
        assert isinstance(state, WordleState) and state.done and state.answer is not None
        assert state.step_count == obs.turn <= 6
        assert state.episode_return == pytest.approx(total, abs=1e-6)
        assert obs.solved == (state.answer == obs.guesses[-1])
        assert -3.0 <= total <= 2.5


def test_episode_rewards_equal_batch_scores(main_server):
    """The same completion earns the same reward through a session and through /v1/score."""
    completions = ["[crane]", "crane", "[zzzzz]", "hello world", "[caper]"]
    scorer = EnvPool([main_server.url], token=None, timeout_s=60, retry_after_s=1)  # the trainer's scoring client
    try:
        rewards = scorer.score("wordle", ["wordle:0000"] * len(completions), completions)
    finally:
        scorer.close()
    with DwsEnvClient(base_url=main_server.url).sync() as env:
        for c, expected in zip(completions, rewards):
            env.reset(task="wordle", prompt_id="wordle:0000")
            assert env.step(c).reward == expected


def test_single_turn_tasks_over_a_session(main_server):
    with DwsEnvClient(base_url=main_server.url).sync() as env:
        for name in ("letter", "short", "reverse"):
            result = env.reset(task=name, seed=3)
            assert result.observation.task == name and result.observation.max_turns == 1
            target = tasks.get(name).prompt(result.observation.prompt_id).target
            answer = {"letter": target * 3, "short": "", "reverse": target}[name]
            result = env.step(answer)
            assert result.done and result.reward == 1.0
            assert isinstance(env.state(), TaskState)


def test_session_errors_are_clear_and_the_session_survives(main_server):
    with DwsEnvClient(base_url=main_server.url).sync() as env:
        with pytest.raises(RuntimeError, match="no episode in progress"):
            env.step("[crane]")
        with pytest.raises(RuntimeError, match="unknown task 'chess'"):
            env.reset(task="chess")
        with pytest.raises(RuntimeError, match="invalid reset options"):
            env.reset(task="wordle", seed="soon")
        with pytest.raises(RuntimeError, match="Invalid message|validation|text"):
            env.step(TextAction(text="x" * 10).model_copy(update={"text": "y" * 20_000}))
        # still usable after every error
        assert env.reset(task="letter", prompt_id="letter:00").observation.prompt == "letter: a"
        assert env.step("a").reward == 1.0
        with pytest.raises(RuntimeError, match="episode is over"):
            env.step("a")


def test_async_clients_hold_parallel_sessions(main_server):
    async def run() -> list[float]:
        clients = [DwsEnvClient(base_url=main_server.url) for _ in range(8)]
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            await asyncio.gather(*(c.reset(task="reverse", prompt_id=f"reverse:{i:03d}")
                                   for i, c in enumerate(clients)))
            assert active_sessions(main_server) >= 8
            answers = [tasks.get("reverse").prompt(f"reverse:{i:03d}").target for i in range(8)]
            results = await asyncio.gather(*(c.step(a) for c, a in zip(clients, answers)))
            return [r.reward for r in results]
        finally:
            await asyncio.gather(*(c.close() for c in clients))

    assert asyncio.run(run()) == [1.0] * 8


def test_closing_a_client_frees_its_session(main_server):
    wait_for_sessions(main_server, 0)
    env = DwsEnvClient(base_url=main_server.url).sync()
    env.connect()
    env.reset(task="short")
    assert active_sessions(main_server) == 1
    env.close()
    wait_for_sessions(main_server, 0)
