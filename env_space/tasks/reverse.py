"""`reverse`: reverse a 3-letter string -- a single-turn task with partial credit per character.

Owns the rules of the `reverse` task. Prompts are 'reverse: abc' for 200 distinct lowercase strings drawn once from a
fixed seed (ids `reverse:000` .. `reverse:199`). The completion is stripped and lowercased; each of the first three
characters that matches the reversed string earns 0.3, and an exact answer earns 0.1 more. Range [0, 1].
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterable
from typing import ClassVar

from env_space.tasks import register
from env_space.tasks.base import Prompt, SingleTurnTask

N_PROMPTS = 200
LENGTH = 3
PER_CHAR = 0.3
EXACT_BONUS = 0.1
_SEED = 3  # fixed forever: the prompt ids must keep naming the same strings
_PARSE = re.compile(r"^\s*reverse:\s*([a-z]{3})\s*$", re.IGNORECASE)


@register
class ReverseTask(SingleTurnTask):
    name: ClassVar[str] = "reverse"
    description: ClassVar[str] = "Reverse a 3-letter string; 0.3 per correct character, +0.1 when exact."
    answer_format: ClassVar[str] = "the reversed string, e.g. 'cba' for 'reverse: abc'"
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def build_prompts(self) -> Iterable[Prompt]:
        rng = random.Random(_SEED)
        seen: list[str] = []
        while len(seen) < N_PROMPTS:
            s = "".join(rng.choice(string.ascii_lowercase) for _ in range(LENGTH))
            if s not in seen:
                seen.append(s)
        return [Prompt(prompt_id=f"{self.name}:{i:03d}", text=f"reverse: {s}", target=s[::-1])
                for i, s in enumerate(seen)]

    def parse_prompt(self, text: str) -> Prompt | None:
        m = _PARSE.match(text)
        return Prompt(prompt_id=None, text=text, target=m.group(1).lower()[::-1]) if m else None

    def reward(self, prompt: Prompt, completion: str) -> float:
        got = completion.strip().lower()
        matches = sum(1 for a, b in zip(got[:LENGTH], prompt.target) if a == b)
        return PER_CHAR * matches + (EXACT_BONUS if got == prompt.target else 0.0)
