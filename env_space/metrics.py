"""Live counters behind `GET /status` and the Gradio page: request rates and mean reward per task.

Owns `Metrics`. The guard middleware counts HTTP requests and WebSocket messages, environments report each step and
finished episode, and `/v1/score` reports each scored completion. Rates are over a sliding window of one-second
buckets so that `/status` shows current throughput rather than a lifetime average. Writers are the event loop and
reads also come from Gradio's worker threads, hence the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class RateWindow:
    """Events per second over the last `window_s` seconds, in whole-second buckets (not thread-safe alone)."""

    def __init__(self, *, window_s: int, clock: Callable[[], float]) -> None:
        self._window = window_s
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [second, count]
        self.total = 0

    def add(self, n: int = 1) -> None:
        sec = math.floor(self._clock())
        if self._buckets and self._buckets[-1][0] == sec:
            self._buckets[-1][1] += n
        else:
            self._buckets.append([sec, n])
        self.total += n
        self._trim(sec)

    def rate(self) -> float:
        now = self._clock()
        self._trim(math.floor(now))
        return sum(c for _, c in self._buckets) / self._window

    def _trim(self, sec: int) -> None:
        # Hazard: without trimming, an idle-then-busy server would report stale bursts and the deque would grow.
        while self._buckets and self._buckets[0][0] <= sec - self._window:
            self._buckets.popleft()


@dataclass
class _TaskStats:
    rewards: int = 0
    reward_sum: float = 0.0
    scored: int = 0
    episodes: int = 0
    return_sum: float = 0.0


class Metrics:
    """Thread-safe counters; `snapshot()` is the JSON-ready view."""

    def __init__(self, *, window_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._started = clock()
        self._window_s = window_s
        self._requests = RateWindow(window_s=window_s, clock=clock)
        self._steps = RateWindow(window_s=window_s, clock=clock)
        self._scored = RateWindow(window_s=window_s, clock=clock)
        self._tasks: dict[str, _TaskStats] = {}

    def record_request(self) -> None:
        with self._lock:
            self._requests.add()

    def record_step(self, task: str, reward: float, *, episode_return: float | None) -> None:
        """One environment turn; `episode_return` is given when that turn ended the episode."""
        with self._lock:
            self._steps.add()
            st = self._tasks.setdefault(task, _TaskStats())
            st.rewards += 1
            st.reward_sum += reward
            if episode_return is not None:
                st.episodes += 1
                st.return_sum += episode_return

    def record_scores(self, task: str, rewards: Iterable[float]) -> None:
        rewards = list(rewards)
        with self._lock:
            self._scored.add(len(rewards))
            st = self._tasks.setdefault(task, _TaskStats())
            st.rewards += len(rewards)
            st.scored += len(rewards)
            st.reward_sum += sum(rewards)

    def snapshot(self, task_names: Iterable[str] = ()) -> dict:
        with self._lock:
            per_task = {}
            for name in sorted(set(task_names) | set(self._tasks)):
                st = self._tasks.get(name, _TaskStats())
                per_task[name] = {
                    "rewards": st.rewards,
                    "mean_reward": st.reward_sum / st.rewards if st.rewards else None,
                    "scored": st.scored,
                    "episodes": st.episodes,
                    "mean_return": st.return_sum / st.episodes if st.episodes else None,
                }
            return {
                "uptime_s": round(self._clock() - self._started, 3),
                "window_s": self._window_s,
                "requests_total": self._requests.total,
                "requests_per_s": self._requests.rate(),
                "steps_total": self._steps.total,
                "steps_per_s": self._steps.rate(),
                "scored_total": self._scored.total,
                "scored_per_s": self._scored.rate(),
                "tasks": per_task,
            }
