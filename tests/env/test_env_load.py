"""Bounded load on loopback: 256 concurrent Wordle sessions played to the end, and batch-scoring throughput.

Zero errors are required; the measured figures (sessions held at once, latency percentiles, scored requests/s) are
printed. Client and server share this machine's cores, so latencies include the client's own work.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from env_helpers import WordlePlayer, percentile

from env_space import tasks
from env_space.client import DwsEnvClient
from env_space.tasks.wordle import mark

N_SESSIONS = 256
WORDLE = tasks.get("wordle")


def plan_game(seed: int, prompt_id: str) -> list[tuple[str, str]]:
    """The (guess, marks) sequence a consistent-candidate player makes against this prompt's answer."""
    answer = WORDLE.prompt(prompt_id).target
    player, guesses, marks = WordlePlayer(seed=seed), [], []
    while len(guesses) < WORDLE.max_turns and answer not in guesses:
        g = player.guess(guesses, marks)
        guesses.append(g)
        marks.append(mark(g, answer))
    return list(zip(guesses, marks))


def test_256_concurrent_wordle_sessions_play_to_the_end(main_server, capsys):
    async def run() -> dict:
        clients = [DwsEnvClient(base_url=main_server.url, connect_timeout_s=60, message_timeout_s=60)
                   for _ in range(N_SESSIONS)]
        step_latency: list[float] = []
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            firsts = await asyncio.gather(*(c.reset(task="wordle", seed=i) for i, c in enumerate(clients)))
            t_open = time.perf_counter() - t0
            async with httpx.AsyncClient(base_url=main_server.url) as http:
                held = (await http.get("/status")).json()["sessions"]["active"]

            # Plan every game before timing: the player's search runs here, not between timed steps, so the
            # latencies measure the server (and the server's marks are checked against a local replay).
            plans = [plan_game(i, r.observation.prompt_id) for i, r in enumerate(firsts)]

            async def play(client: DwsEnvClient, plan: list[tuple[str, str]]):
                result = None
                for guess, expected_marks in plan:
                    t = time.perf_counter()
                    result = await client.step(f"[{guess}]")
                    step_latency.append(time.perf_counter() - t)
                    assert result.observation.marks[-1] == expected_marks
                return result

            t_play = time.perf_counter()
            finals = await asyncio.gather(*(play(c, p) for c, p in zip(clients, plans)), return_exceptions=True)
            play_wall = time.perf_counter() - t_play
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        return {"held": held, "finals": finals, "lat": step_latency, "wall": time.perf_counter() - t0,
                "play": play_wall, "open": t_open}

    out = asyncio.run(run())
    errors = [f for f in out["finals"] if isinstance(f, BaseException)]
    assert errors == [], errors[:3]
    assert out["held"] >= N_SESSIONS
    assert all(f.done for f in out["finals"])
    solved = sum(f.observation.solved for f in out["finals"])
    lat = out["lat"]
    with capsys.disabled():
        print(f"\n[load] {N_SESSIONS} sessions held at once: {out['held']} (connect+reset {out['open']:.1f}s); "
              f"{len(lat)} steps in {out['play']:.2f}s ({len(lat) / out['play']:.0f} steps/s); "
              f"step latency p50 {percentile(lat, 50) * 1e3:.1f} ms p99 {percentile(lat, 99) * 1e3:.1f} ms; "
              f"solved {solved}/{N_SESSIONS}")
    deadline = time.monotonic() + 15
    while httpx.get(f"{main_server.url}/status").json()["sessions"]["active"] != 0:
        assert time.monotonic() < deadline, "sessions were not released after the clients closed"
        time.sleep(0.1)


def test_batch_scoring_throughput(main_server, capsys):
    n_requests, concurrency, batch = 400, 16, 64
    body = {"task": "letter", "items": [{"prompt_id": f"letter:{i % 52:02d}", "completion": "abc" * (i % 5)}
                                        for i in range(batch)]}

    async def run() -> tuple[list[float], list[int], float]:
        latency: list[float] = []
        statuses: list[int] = []
        queue = list(range(n_requests))

        async def worker(http: httpx.AsyncClient) -> None:
            while queue:
                queue.pop()
                t = time.perf_counter()
                r = await http.post("/v1/score", json=body)
                latency.append(time.perf_counter() - t)
                statuses.append(r.status_code)
                assert len(r.json()["rewards"]) == batch

        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=main_server.url, limits=limits, timeout=60) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(http) for _ in range(concurrency)))
            return latency, statuses, time.perf_counter() - t0

    latency, statuses, wall = asyncio.run(run())
    assert statuses == [200] * n_requests
    with capsys.disabled():
        print(f"\n[score] {n_requests} POST /v1/score x {batch} items, {concurrency} concurrent: "
              f"{n_requests / wall:.0f} req/s, {n_requests * batch / wall:.0f} completions/s; "
              f"latency p50 {percentile(latency, 50) * 1e3:.1f} ms p99 {percentile(latency, 99) * 1e3:.1f} ms")
