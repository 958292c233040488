"""The task contract: prompts with stable ids, episode rules and rewards, independent of any transport.

Owns `Task` (and `SingleTurnTask`), `Prompt`, `Episode` and `Outcome`. A task is pure Python: given a prompt and a
completion it decides the reward, feedback and whether the episode ends. `env_space.environment` drives tasks behind
OpenEnv's server and `env_space.v1` scores batches with the very same `Task.step`, so a reward can never differ
between the episode API and the batch API. Every task declares the range its per-turn reward lies in.
"""

from __future__ import annotations

import random
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from env_space.models import TaskObservation, TaskState


@dataclass(frozen=True, slots=True)
class Prompt:
    """One question of a task. `target` is what the reward is computed against and is never sent to clients."""

    prompt_id: str | None  # '<task>:<n>' for listed prompts; None for ad-hoc prompt text a task could parse
    text: str
    target: str


@dataclass(slots=True)
class Episode:
    """Mutable progress through one prompt; tasks keep their own extra data in `data`."""

    prompt: Prompt
    max_turns: int
    turn: int = 0
    done: bool = False
    episode_return: float = 0.0
    feedback: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of one turn as decided by the task."""

    reward: float
    feedback: str
    done: bool


class Task(ABC):
    """A registered task. Subclasses set the class attributes and implement `build_prompts` and `play`."""

    name: ClassVar[str]
    description: ClassVar[str]
    answer_format: ClassVar[str]
    reward_range: ClassVar[tuple[float, float]]  # bounds of the reward of any single turn
    max_turns: ClassVar[int] = 1
    observation_cls: ClassVar[type[TaskObservation]] = TaskObservation
    state_cls: ClassVar[type[TaskState]] = TaskState

    def __init__(self) -> None:
        prompts = tuple(self.build_prompts())
        by_id: dict[str, Prompt] = {}
        for p in prompts:
            # Hazard: a duplicate or unprefixed id would make two prompts share a score line or route to the
            # wrong task when an action names only its prompt_id.
            if p.prompt_id is None or not p.prompt_id.startswith(f"{self.name}:") or p.prompt_id in by_id:
                raise ValueError(f"task {self.name!r}: bad or duplicate prompt id {p.prompt_id!r}")
            by_id[p.prompt_id] = p
        if not prompts:
            raise ValueError(f"task {self.name!r} has no prompts")
        self._prompts = prompts
        self._by_id = by_id
        texts: dict[str, list[Prompt]] = {}
        for p in prompts:
            texts.setdefault(p.text, []).append(p)
        # Only texts that identify one prompt can be looked up by text (Wordle's opening text is shared by all).
        self._by_text = {t: ps[0] for t, ps in texts.items() if len(ps) == 1}

    # ---- prompts ---------------------------------------------------------------------------------------------
    @abstractmethod
    def build_prompts(self) -> Iterable[Prompt]:
        """The task's fixed, deterministic prompt list; ids must be '<name>:<n>' and never reused for other text."""

    @property
    def prompts(self) -> tuple[Prompt, ...]:
        return self._prompts

    def prompt(self, prompt_id: str) -> Prompt | None:
        return self._by_id.get(prompt_id)

    def prompt_for_text(self, text: str) -> Prompt | None:
        """A listed prompt with exactly this text, else whatever `parse_prompt` makes of it."""
        return self._by_text.get(text) or self.parse_prompt(text)

    def parse_prompt(self, text: str) -> Prompt | None:
        """Override to accept prompt text that is not in the list (returns a prompt with `prompt_id=None`)."""
        return None

    def pick(self, *, seed: int | None) -> Prompt:
        """The prompt for a reset: deterministic under `seed`, uniformly random without one."""
        n = len(self._prompts)
        index = secrets.randbelow(n) if seed is None else random.Random(seed).randrange(n)
        return self._prompts[index]

    def sample(self, *, n: int | None, seed: int | None) -> list[Prompt]:
        """`n` prompts: the first n in list order without a seed, a seeded sample without repeats with one."""
        k = len(self._prompts) if n is None else min(n, len(self._prompts))
        if seed is None:
            return list(self._prompts[:k])
        return random.Random(seed).sample(self._prompts, k)

    # ---- episodes --------------------------------------------------------------------------------------------
    def new_episode(self, prompt: Prompt) -> Episode:
        episode = Episode(prompt=prompt, max_turns=self.max_turns)
        self.start(episode)
        return episode

    def start(self, episode: Episode) -> None:
        """Override to initialise `episode.data`."""

    @abstractmethod
    def play(self, episode: Episode, completion: str) -> Outcome:
        """Apply one turn (`episode.turn` is already the 1-based number of this turn) and judge it."""

    def step(self, episode: Episode, completion: str) -> Outcome:
        """One turn with the bookkeeping every task shares; the turn limit always ends the episode."""
        if episode.done:
            raise RuntimeError("step on a finished episode")  # callers check first; this is a programming error
        episode.turn += 1
        outcome = self.play(episode, completion)
        # Rounded so that the same answer scores bit-identically on every path (no 0.9999999999999999 vs 1.0).
        outcome = Outcome(reward=round(float(outcome.reward), 6), feedback=outcome.feedback, done=outcome.done)
        episode.episode_return += outcome.reward
        episode.feedback = outcome.feedback
        episode.done = outcome.done or episode.turn >= episode.max_turns
        return outcome

    def score(self, prompt: Prompt, completion: str) -> Outcome:
        """Reward of `completion` as the first turn of a fresh episode at `prompt` (the batch-scoring path)."""
        return self.step(self.new_episode(prompt), completion)

    # ---- views -----------------------------------------------------------------------------------------------
    def render(self, episode: Episode) -> str:
        """Prompt text for the model's next turn; multi-turn tasks add the history."""
        return episode.prompt.text

    def observation_extra(self, episode: Episode) -> dict[str, Any]:
        return {}

    def state_extra(self, episode: Episode) -> dict[str, Any]:
        return {}

    def observation(self, episode: Episode, *, reward: float | None) -> TaskObservation:
        return self.observation_cls(
            task=self.name,
            prompt_id=episode.prompt.prompt_id,
            prompt=self.render(episode),
            turn=episode.turn,
            max_turns=episode.max_turns,
            feedback=episode.feedback,
            reward=reward,
            done=episode.done,
            **self.observation_extra(episode),
        )

    def state(self, episode: Episode, *, episode_id: str | None) -> TaskState:
        return self.state_cls(
            episode_id=episode_id,
            step_count=episode.turn,
            task=self.name,
            prompt_id=episode.prompt.prompt_id,
            max_turns=episode.max_turns,
            done=episode.done,
            episode_return=episode.episode_return,
            **self.state_extra(episode),
        )


class SingleTurnTask(Task):
    """A task answered in one completion: subclasses implement `reward` only."""

    max_turns: ClassVar[int] = 1

    @abstractmethod
    def reward(self, prompt: Prompt, completion: str) -> float:
        """Graded reward in `reward_range`; must be dense enough for a tiny random model to get signal."""

    def play(self, episode: Episode, completion: str) -> Outcome:
        r = float(self.reward(episode.prompt, completion))
        return Outcome(reward=r, feedback=f"reward {r:.3f}", done=True)
