"""`short`: answer briefly -- a single-turn task whose reward rises smoothly as the completion gets shorter.

Owns the rules of the `short` task. It teaches a tiny model to emit its end-of-sequence token early. The reward is
1 / (1 + n / 16) with n the length of the stripped completion in characters: 1.0 for an empty answer, 0.5 at 16
characters, still above 0 for any length, so every pair of completions of different length is ranked (dense signal
for GRPO's group advantage). Range [0, 1]. Any prompt text is accepted by the batch scorer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from env_space.tasks import register
from env_space.tasks.base import Prompt, SingleTurnTask

HALF_LENGTH = 16  # characters at which the reward is 0.5
PROMPTS = (
    "hi", "hello", "say something short", "be brief", "one word", "reply briefly", "what is up", "ok?",
    "tell me a fact", "describe the sea", "count to three", "name a color", "greet me", "answer in a word",
    "are you there", "thanks", "good morning", "how are you", "pick a number", "say yes or no",
    "finish this: the cat", "write a story", "explain gravity", "list some fruits",
)


@register
class ShortTask(SingleTurnTask):
    name: ClassVar[str] = "short"
    description: ClassVar[str] = "Answer as briefly as possible; reward 1/(1+len/16) of the stripped completion."
    answer_format: ClassVar[str] = "free text; shorter is better (empty is best)"
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def build_prompts(self) -> Iterable[Prompt]:
        return [Prompt(prompt_id=f"{self.name}:{i:02d}", text=t, target="") for i, t in enumerate(PROMPTS)]

    def parse_prompt(self, text: str) -> Prompt | None:
        return Prompt(prompt_id=None, text=text, target="")  # the reward does not depend on the prompt

    def reward(self, prompt: Prompt, completion: str) -> float:
        return 1.0 / (1.0 + len(completion.strip()) / HALF_LENGTH)
