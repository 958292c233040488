"""Test helpers for the env suite: a consistent-candidate Wordle player and latency percentiles."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from env_space.tasks.wordle import load_words, mark

WORDS = load_words()
REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"


class WordlePlayer:
    """Guesses a word consistent with every mark seen so far (random among them, seeded)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._candidates = list(WORDS)

    def guess(self, guesses: Sequence[str], marks: Sequence[str]) -> str:
        self._candidates = [w for w in self._candidates
                            if w not in guesses and all(mark(g, w) == m for g, m in zip(guesses, marks))]
        return self._rng.choice(self._candidates)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]
