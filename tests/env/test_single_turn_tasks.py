"""Rules, reward ranges and prompt stability of the single-turn tasks, and of the registry (no server)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from env_space import tasks
from env_space.tasks import SingleTurnTask

LETTER, SHORT, REVERSE = tasks.get("letter"), tasks.get("short"), tasks.get("reverse")


def score(task, prompt_id: str, completion: str) -> float:
    return task.score(task.prompt(prompt_id), completion).reward


def test_registry_lists_every_task_module():
    assert set(tasks.names()) >= {"wordle", "letter", "short", "reverse"}
    for t in tasks.all_tasks():
        lo, hi = t.reward_range
        assert lo < hi and t.max_turns >= 1 and t.prompts


def test_letter_rewards_are_graded():
    pid = "letter:16"  # 'letter: q'
    assert LETTER.prompt(pid).text == "letter: q"
    assert score(LETTER, pid, "") == 0.0
    assert score(LETTER, pid, "zzzz") == 0.0
    assert score(LETTER, pid, "zzzq") == pytest.approx(0.125)  # a quarter of the characters, no start bonus
    assert score(LETTER, pid, "qzzz") == pytest.approx(0.625)
    assert score(LETTER, pid, "Q q Q") == 1.0  # case-insensitive, whitespace ignored
    ladder = [score(LETTER, pid, c) for c in ("abcd", "abcq", "abqq", "aqqq", "qqqq")]
    assert ladder == sorted(ladder) and len(set(ladder)) == 5  # every extra target letter is signal


def test_letter_prompt_text_is_understood():
    assert LETTER.prompt_for_text("write the letter k").target == "k"
    assert LETTER.prompt_for_text("letter: Z").target == "z"
    assert LETTER.prompt_for_text("letter: ab") is None


def test_short_prefers_short_completions_smoothly():
    pid = "short:00"
    assert score(SHORT, pid, "") == 1.0
    assert score(SHORT, pid, "x" * 16) == pytest.approx(0.5)
    lengths = [score(SHORT, pid, "y" * n) for n in (0, 1, 2, 5, 10, 40, 200)]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == len(lengths)
    assert score(SHORT, pid, "  ok  ") == score(SHORT, pid, "ok")
    assert SHORT.prompt_for_text("anything at all") is not None


def test_reverse_partial_credit_per_character():
    pid = "reverse:000"
    p = REVERSE.prompt(pid)
    assert p.text == "reverse: hsr" and p.target == "rsh"
    assert score(REVERSE, pid, "rsh") == 1.0
    assert score(REVERSE, pid, " RSH\n") == 1.0
    assert score(REVERSE, pid, "rsx") == pytest.approx(0.6)
    assert score(REVERSE, pid, "r") == pytest.approx(0.3)
    assert score(REVERSE, pid, "hsr") == pytest.approx(0.3)  # the unreversed string only shares the middle
    assert score(REVERSE, pid, "rshh") == pytest.approx(0.9)  # all three right but not exact
    assert score(REVERSE, pid, "") == 0.0
    assert REVERSE.prompt_for_text("reverse: abc").target == "cba"


def test_prompt_lists_are_deterministic_with_stable_ids():
    assert LETTER.prompt("letter:00").text == "letter: a" and LETTER.prompt("letter:51").text == "write the letter z"
    assert REVERSE.prompt("reverse:199").text == "reverse: zmg"
    assert SHORT.prompt("short:00").text == "hi"
    for t in tasks.all_tasks():
        ids = [p.prompt_id for p in t.prompts]
        assert len(ids) == len(set(ids)) and all(i.startswith(f"{t.name}:") for i in ids)
        # a fresh instance builds the very same list
        assert [(p.prompt_id, p.text, p.target) for p in type(t)().prompts] == \
            [(p.prompt_id, p.text, p.target) for p in t.prompts]
        assert t.sample(n=5, seed=7) == t.sample(n=5, seed=7)
        assert t.sample(n=3, seed=None) == list(t.prompts[:3])


@given(task_name=st.sampled_from(["letter", "short", "reverse"]), index=st.integers(0, 10_000),
       completion=st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_single_turn_rewards_stay_in_declared_range(task_name, index, completion):
    task = tasks.get(task_name)
    assert isinstance(task, SingleTurnTask)
    prompt = task.prompts[index % len(task.prompts)]
    out = task.score(prompt, completion)
    lo, hi = task.reward_range
    assert lo <= out.reward <= hi and out.done


def test_a_random_policy_gets_signal_on_the_learnable_tasks():
    # GRPO needs reward variance within a group of samples from a random model: check that random short strings
    # over a small alphabet already spread the reward of `letter` and `short`.
    import random

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    for task, pid in ((LETTER, "letter:00"), (SHORT, "short:00")):
        rewards = {score(task, pid, "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
                   for _ in range(64)}
        assert len(rewards) >= 4, (task.name, rewards)
