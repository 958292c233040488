"""Wordle rules and rewards, tested on the task directly (no server): marks, parsing, penalties, solving, limits."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from env_space import tasks
from env_space.environment import TaskEnvironment
from env_space.errors import EnvInputError
from env_space.models import TextAction
from env_space.tasks.wordle import (
    MALFORMED_PENALTY,
    NOT_A_WORD_PENALTY,
    REPEAT_PENALTY,
    WordleObservation,
    load_words,
    mark,
    parse_guess,
)

WORDLE = tasks.get("wordle")


def episode_for(answer: str):
    prompt = next(p for p in WORDLE.prompts if p.target == answer)
    return WORDLE.new_episode(prompt)


@pytest.mark.parametrize(
    ("guess", "answer", "expected"),
    [
        ("crane", "crane", "GGGGG"),
        ("paper", "apple", "YYGY-"),  # two p's in both: one green, one yellow
        ("eerie", "crane", "--Y-G"),  # three e's in the guess, one in the answer: only the green counts
        ("geese", "speed", "-YGY-"),  # two e's in the answer: green + one yellow, the third e is gray
        ("babes", "abbey", "YYGG-"),
        ("hello", "llama", "--YY-"),  # two l's in both, none in place: both yellow
        ("level", "hotel", "---GG"),  # the first e and l get nothing once the greens used them up
        ("sassy", "abyss", "YY-GY"),
        ("zzzzz", "crane", "-----"),
    ],
)
def test_marks_with_repeated_letters(guess, answer, expected):
    assert mark(guess, answer) == expected


words = st.text(alphabet="abcde", min_size=5, max_size=5)


@given(guess=words, answer=words)
@settings(max_examples=300, deadline=None)
def test_marks_match_letter_counting_definition(guess, answer):
    m = mark(guess, answer)
    assert all(m[i] == "G" for i in range(5) if guess[i] == answer[i])
    assert all(m[i] != "G" for i in range(5) if guess[i] != answer[i])
    # for each letter, greens + yellows == min(count in guess, count in answer)
    for c in set(guess):
        credited = sum(1 for i in range(5) if guess[i] == c and m[i] in "GY")
        assert credited == min(guess.count(c), answer.count(c))
    # yellows go to the leftmost non-green occurrences
    for c in set(guess):
        slots = [i for i in range(5) if guess[i] == c and m[i] != "G"]
        flags = [m[i] == "Y" for i in slots]
        assert flags == sorted(flags, reverse=True)


@pytest.mark.parametrize(
    ("completion", "guess"),
    [
        ("[crane]", "crane"),
        ("My guess is [CRANE].", "crane"),
        ("[ slate ] then [crane]", "slate"),
        ("crane", "crane"),
        ("**Crane**", "crane"),
        ("  crane\n", "crane"),
        ("I think crane", None),  # two words and no brackets: ambiguous, malformed
        ("[cranes]", None),
        ("[cr4ne]", None),
        ("", None),
        ("cranes", None),
    ],
)
def test_parse_guess(completion, guess):
    assert parse_guess(completion) == guess


def test_word_list_is_shipped_clean_and_large():
    words = load_words()
    assert 500 <= len(words) <= 5000
    assert all(re.fullmatch(r"[a-z]{5}", w) for w in words)
    assert len(set(words)) == len(words)
    assert {"crane", "slate", "apple", "hotel"} <= set(words)


def test_solve_first_turn_gets_the_maximum():
    ep = episode_for("crane")
    out = WORDLE.step(ep, "[crane]")
    assert out.done and ep.done
    assert out.reward == pytest.approx(WORDLE.reward_range[1]) == pytest.approx(2.5)
    assert ep.data["solved"]


def test_fewer_turns_earn_more():
    def solve_on(turn: int) -> float:
        ep = episode_for("crane")
        fillers = ["[zzzzz]"] * (turn - 1)  # invalid words: penalised equally for every solve turn
        for f in fillers:
            WORDLE.step(ep, f)
        WORDLE.step(ep, "[crane]")
        assert ep.data["solved"] and ep.turn == turn
        return ep.episode_return - NOT_A_WORD_PENALTY * (turn - 1)

    returns = [solve_on(t) for t in range(1, 7)]
    assert returns == sorted(returns, reverse=True) and len(set(returns)) == 6


def test_partial_credit_is_for_new_information_only():
    ep = episode_for("crane")
    first = WORDLE.step(ep, "[crate]")  # c r a _ e: 4 greens -> phi 0.8
    assert first.reward == pytest.approx(0.5 * 0.8)
    again = WORDLE.step(ep, "[grate]")  # 3 greens: no improvement of the best
    assert again.reward == 0.0
    assert ep.data["marks"] == ["GGG-G", "-GG-G"]


def test_penalties_use_turns_and_do_not_enter_the_board():
    ep = episode_for("crane")
    assert WORDLE.step(ep, "no idea").reward == MALFORMED_PENALTY
    assert WORDLE.step(ep, "[qzxvw]").reward == NOT_A_WORD_PENALTY
    WORDLE.step(ep, "[slate]")
    assert WORDLE.step(ep, "[SLATE]").reward == REPEAT_PENALTY
    assert ep.turn == 4 and ep.data["guesses"] == ["slate"] and not ep.done
    obs = WORDLE.observation(ep, reward=REPEAT_PENALTY)
    assert isinstance(obs, WordleObservation) and obs.last_valid is False and obs.last_guess == "slate"
    assert "already guessed" in obs.feedback


def test_turn_limit_ends_the_episode_and_reveals_the_answer():
    ep = episode_for("crane")
    for g in ["slate", "pilot", "mouth", "hello", "world"]:
        WORDLE.step(ep, f"[{g}]")
        assert not ep.done
    assert WORDLE.state(ep, episode_id="e").answer is None  # hidden while playing
    WORDLE.step(ep, "[bingo]")
    assert ep.done and not ep.data["solved"] and ep.turn == 6
    assert "crane" in ep.feedback
    assert WORDLE.state(ep, episode_id="e").answer == "crane"
    assert ep.episode_return <= 0.5


@given(st.lists(st.text(max_size=12) | st.sampled_from(["[crane]", "[slate]", "[zzzzz]", "crane", "[apple]"]),
                min_size=1, max_size=8))
@settings(max_examples=150, deadline=None)
def test_rewards_stay_in_declared_range(completions):
    ep = episode_for("apple")
    lo, hi = WORDLE.reward_range
    for c in completions:
        if ep.done:
            break
        r = WORDLE.step(ep, c).reward
        assert lo <= r <= hi
    assert -3.0 <= ep.episode_return <= 2.5
    if not ep.data["solved"]:
        assert ep.episode_return <= 0.5


def test_reset_is_deterministic_under_a_seed():
    env = TaskEnvironment()
    ids = [env.reset(task="wordle", seed=s).prompt_id for s in (1, 2, 3, 1, 2, 3)]
    assert ids[:3] == ids[3:]
    assert len({env.reset(task="wordle", seed=s).prompt_id for s in range(20)}) > 10


def test_prompt_ids_are_stable():
    # A changed word list or shuffle would silently re-map every published id; this pins a few of them.
    assert [WORDLE.prompt(f"wordle:{i:04d}").target for i in range(4)] == ["caper", "count", "write", "tryst"]
    assert WORDLE.prompt("wordle:1692").target == "slice"
    assert len({p.prompt_id for p in WORDLE.prompts}) == len(load_words())
    assert Counter(p.target for p in WORDLE.prompts) == Counter(load_words())


def test_environment_full_episode_and_misuse():
    env = TaskEnvironment()
    obs = env.reset(task="wordle", prompt_id="wordle:0000")
    assert obs.turn == 0 and not obs.done and obs.prompt.startswith("Let's play Wordle")
    with pytest.raises(EnvInputError) as e:
        env.step(TextAction(text="[crane]", prompt_id="wordle:0001"))
    assert e.value.status_code == 409
    obs = env.step(TextAction(text="[caper]"))
    assert obs.done and obs.solved and obs.reward == pytest.approx(2.5)
    with pytest.raises(EnvInputError, match="episode is over"):
        env.step(TextAction(text="[caper]"))
    with pytest.raises(EnvInputError, match="unknown prompt_id"):
        env.reset(task="wordle", prompt_id="wordle:99999")
    with pytest.raises(EnvInputError, match="invalid reset options"):
        env.reset(task="wordle", colour="blue")
    env.close()
    with pytest.raises(EnvInputError, match="expired"):
        env.reset(task="wordle")
