"""Wordle: a real multi-turn episode with correct repeated-letter marks, shaped rewards and a shipped word list.

Owns the rules of the `wordle` task: reading a guess out of a completion, marking it against the answer, and the
per-turn reward. The vocabulary is `wordle_words.txt` next to this module (written for this repository; no download):
every listed word is an allowed guess and a possible answer. Prompt ids `wordle:NNNN` index a fixed seeded shuffle of
the list, so an id names the same answer for as long as the list is unchanged.

Answer format: the guess is the first `[abcde]` in the completion (five letters in square brackets, any case,
spaces inside the brackets allowed); failing that, a completion whose only word is five letters long (`crane`,
`**CRANE**`). Anything else is malformed.

Marks, one per letter: `G` right letter in the right spot, `Y` in the answer elsewhere, `-` not in the answer. A
letter repeated in the guess is marked G/Y only as many times as it occurs in the answer; greens are assigned first,
then yellows left to right.

Reward of a turn (range [-0.5, 2.5]):
  * malformed -0.5, a word not in the list -0.3, a repeated guess -0.3; each still uses up a turn;
  * partial credit is potential-based: with phi(guess) = (2*greens + yellows) / 10, a valid guess earns
    0.5 * (best phi so far after it - best phi before it). It sums to at most 0.5 per episode, so stalling to farm
    greens/yellows never beats solving;
  * solving adds 1.0 + 0.2 per unused turn (solving on turn 1 of 6 earns 0.5 + 1.0 + 1.0 = 2.5 in total).
An episode's return therefore lies in [-3.0, 2.5]; failing to solve earns at most 0.45.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from importlib import resources
from typing import Any, ClassVar

from pydantic import Field

from env_space.models import TaskObservation, TaskState
from env_space.tasks import register
from env_space.tasks.base import Episode, Outcome, Prompt, Task

GREEN, YELLOW, GRAY = "G", "Y", "-"
WORD_LEN = 5
MAX_TURNS = 6

MALFORMED_PENALTY = -0.5
NOT_A_WORD_PENALTY = -0.3
REPEAT_PENALTY = -0.3
PARTIAL_WEIGHT = 0.5
SOLVE_REWARD = 1.0
SOLVE_PER_SPARE_TURN = 0.2
# Fixed forever: changing it would re-map every published prompt id to a different answer.
_ID_SHUFFLE_SEED = 20_240_611

_BRACKETED = re.compile(r"\[\s*([A-Za-z]{5})\s*\]")
_WORDS = re.compile(r"[A-Za-z]+")


def load_words() -> tuple[str, ...]:
    """The shipped vocabulary, validated: lowercase, five letters, unique (order as in the file)."""
    text = resources.files(__package__).joinpath("wordle_words.txt").read_text(encoding="utf-8")
    words: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        w = raw.strip()
        if not w or w.startswith("#"):
            continue
        # Hazard: one bad line (a 6-letter word, a capital) would make an answer that no valid guess can match.
        if not re.fullmatch(r"[a-z]{5}", w) or w in seen:
            raise ValueError(f"wordle_words.txt: bad or duplicate entry {w!r}")
        seen.add(w)
        words.append(w)
    return tuple(words)


def mark(guess: str, answer: str) -> str:
    """Wordle marks of `guess` against `answer` (both lowercase, five letters)."""
    marks = [GRAY] * WORD_LEN
    unmatched: Counter[str] = Counter()
    for i, (g, a) in enumerate(zip(guess, answer)):
        if g == a:
            marks[i] = GREEN
        else:
            unmatched[a] += 1
    # Yellows only from answer letters not already used by a green, left to right, so a letter repeated in the
    # guess is not credited more often than the answer contains it.
    for i, g in enumerate(guess):
        if marks[i] != GREEN and unmatched[g] > 0:
            marks[i] = YELLOW
            unmatched[g] -= 1
    return "".join(marks)


def parse_guess(completion: str) -> str | None:
    """The guess in a completion per the documented format, lowercased; None if there is none."""
    m = _BRACKETED.search(completion)
    if m:
        return m.group(1).lower()
    words = _WORDS.findall(completion)
    if len(words) == 1 and len(words[0]) == WORD_LEN:
        return words[0].lower()
    return None


def potential(marks: str) -> float:
    return (2 * marks.count(GREEN) + marks.count(YELLOW)) / (2 * WORD_LEN)


class WordleObservation(TaskObservation):
    """Wordle board as typed fields next to the rendered prompt."""

    guesses: list[str] = Field(default_factory=list, description="Valid guesses so far, in order")
    marks: list[str] = Field(default_factory=list, description="Marks of each valid guess, e.g. 'GY--G'")
    last_guess: str | None = Field(default=None, description="Guess read from the last completion, if any")
    last_valid: bool | None = Field(default=None, description="Whether the last turn was a valid new word")
    solved: bool = Field(default=False)


class WordleState(TaskState):
    guesses: list[str] = Field(default_factory=list)
    marks: list[str] = Field(default_factory=list)
    solved: bool = False
    answer: str | None = Field(default=None, description="Revealed only once the episode is over")


INSTRUCTIONS = (
    "Let's play Wordle. Find the secret 5-letter English word in at most {turns} guesses. "
    "Reply with your guess in square brackets, e.g. [crane]. After each guess you get one mark per letter: "
    "G = right letter in the right spot, Y = in the word but elsewhere, - = not in the word "
    "(a repeated letter is marked only as often as it occurs in the word)."
)


@register
class WordleTask(Task):
    name: ClassVar[str] = "wordle"
    description: ClassVar[str] = "Multi-turn Wordle with letter marks; shaped reward, bonus for solving early."
    answer_format: ClassVar[str] = "a 5-letter word in square brackets, e.g. [crane]"
    reward_range: ClassVar[tuple[float, float]] = (MALFORMED_PENALTY, PARTIAL_WEIGHT + SOLVE_REWARD
                                                   + SOLVE_PER_SPARE_TURN * (MAX_TURNS - 1))
    max_turns: ClassVar[int] = MAX_TURNS
    observation_cls: ClassVar[type[TaskObservation]] = WordleObservation
    state_cls: ClassVar[type[TaskState]] = WordleState

    def __init__(self) -> None:
        self.words = load_words()
        self.vocabulary = frozenset(self.words)
        super().__init__()

    def build_prompts(self) -> Iterable[Prompt]:
        order = list(self.words)
        random.Random(_ID_SHUFFLE_SEED).shuffle(order)
        text = INSTRUCTIONS.format(turns=MAX_TURNS)
        return [Prompt(prompt_id=f"{self.name}:{i:04d}", text=text, target=w) for i, w in enumerate(order)]

    def start(self, episode: Episode) -> None:
        episode.data.update(guesses=[], marks=[], best=0.0, solved=False, last_guess=None, last_valid=None)

    def play(self, episode: Episode, completion: str) -> Outcome:
        d = episode.data
        answer = episode.prompt.target
        guess = parse_guess(completion)
        d["last_guess"] = guess
        d["last_valid"] = False
        if guess is None:
            reward = MALFORMED_PENALTY
            feedback = "No guess found: reply with a 5-letter word in brackets, e.g. [crane]."
        elif guess not in self.vocabulary:
            reward, feedback = NOT_A_WORD_PENALTY, f"'{guess}' is not in the word list."
        elif guess in d["guesses"]:
            reward, feedback = REPEAT_PENALTY, f"You already guessed '{guess}'."
        else:
            d["last_valid"] = True
            marks = mark(guess, answer)
            d["guesses"].append(guess)
            d["marks"].append(marks)
            best = max(d["best"], potential(marks))
            reward = PARTIAL_WEIGHT * (best - d["best"])
            d["best"] = best
            feedback = f"{guess} {marks}"
            if guess == answer:
                d["solved"] = True
                reward += SOLVE_REWARD + SOLVE_PER_SPARE_TURN * (episode.max_turns - episode.turn)
                feedback += f" -- solved in {episode.turn} turn{'s' if episode.turn != 1 else ''}!"
        if not d["solved"] and episode.turn >= episode.max_turns:
            feedback += f" Out of turns; the word was '{answer}'."
        return Outcome(reward=reward, feedback=feedback, done=d["solved"])

    def render(self, episode: Episode) -> str:
        d = episode.data
        lines = [episode.prompt.text]
        if d["guesses"]:
            lines.append("Your guesses so far:")
            lines += [f"{i}. {g} {m}" for i, (g, m) in enumerate(zip(d["guesses"], d["marks"]), start=1)]
        if episode.feedback:
            lines.append(f"Last turn: {episode.feedback}")
        if not episode.done:
            left = episode.max_turns - episode.turn
            lines.append(f"{left} guess{'es' if left != 1 else ''} left.")
        return "\n".join(lines)

    def observation_extra(self, episode: Episode) -> dict[str, Any]:
        d = episode.data
        return {
            "guesses": list(d["guesses"]),
            "marks": list(d["marks"]),
            "last_guess": d["last_guess"],
            "last_valid": d["last_valid"],
            "solved": d["solved"],
        }

    def state_extra(self, episode: Episode) -> dict[str, Any]:
        d = episode.data
        return {
            "guesses": list(d["guesses"]),
            "marks": list(d["marks"]),
            "solved": d["solved"],
            "answer": episode.prompt.target if episode.done else None,
        }
