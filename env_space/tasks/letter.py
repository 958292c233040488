"""`letter`: write the letter the prompt names -- a single-turn task a tiny random model learns in a few GRPO steps.

Owns the rules of the `letter` task. Prompts are 'letter: q' and 'write the letter q' for a..z (ids `letter:00` ..
`letter:51`, fixed order). The reward is graded so that any completion containing the letter gets some signal:
0.5 if the first non-space character is the target (case-insensitive) plus 0.5 x the fraction of non-space characters
that are the target. Range [0, 1]; an empty completion scores 0.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import ClassVar

from env_space.tasks import register
from env_space.tasks.base import Prompt, SingleTurnTask

TEMPLATES = ("letter: {c}", "write the letter {c}")
_PARSE = re.compile(r"^\s*(?:letter:|write the letter)\s*([a-z])\s*$", re.IGNORECASE)


@register
class LetterTask(SingleTurnTask):
    name: ClassVar[str] = "letter"
    description: ClassVar[str] = "Write the letter named in the prompt; graded by how much of the reply is that letter."
    answer_format: ClassVar[str] = "free text; ideally only the target letter, e.g. 'qqqq'"
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def build_prompts(self) -> Iterable[Prompt]:
        pairs = [(t, c) for t in TEMPLATES for c in string.ascii_lowercase]
        return [Prompt(prompt_id=f"{self.name}:{i:02d}", text=t.format(c=c), target=c)
                for i, (t, c) in enumerate(pairs)]

    def parse_prompt(self, text: str) -> Prompt | None:
        m = _PARSE.match(text)
        return Prompt(prompt_id=None, text=text, target=m.group(1).lower()) if m else None

    def reward(self, prompt: Prompt, completion: str) -> float:
        chars = [c.lower() for c in completion if not c.isspace()]
        if not chars:
            return 0.0
        target = prompt.target
        starts = 1.0 if chars[0] == target else 0.0
        return 0.5 * starts + 0.5 * (chars.count(target) / len(chars))
