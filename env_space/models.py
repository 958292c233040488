"""Typed OpenEnv models shared by every env_space task: the action, observations and states on the wire.

Owns the `Action`/`Observation`/`State` subclasses that OpenEnv's server publishes at `/schema` and validates on
`/step` and the WebSocket session, and that `env_space.client` parses back. All tasks take the same action -- a model
completion as text -- because the trainer only ever has text to send; each task may extend the observation and state
with its own typed fields (e.g. the Wordle board), and names itself in `task` so a client can pick the right class.
Kept free of the task registry so that tasks can import it without a cycle.
"""

from __future__ import annotations

from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field

# Hazard: an unbounded completion would let one request pin the event loop (rewards are computed inline) and
# balloon memory; 16 Ki characters is far beyond what the trainer generates per turn.
MAX_COMPLETION_CHARS = 16_384
MAX_PROMPT_ID_CHARS = 64


class TextAction(Action):
    """One model turn: the completion text, optionally naming the prompt it answers.

    `prompt_id` lets a stateless HTTP `/step` (a fresh environment per request) score a completion for a known prompt:
    with no episode in progress the environment starts one at that prompt first. Inside a running episode it must
    match the episode's prompt (a guard against answering the wrong question).
    """

    text: str = Field(max_length=MAX_COMPLETION_CHARS, description="The model's completion for this turn")
    prompt_id: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_ID_CHARS,
        description="Stable prompt id ('<task>:<n>') this completion answers; needed only without a running episode",
    )


class TaskObservation(Observation):
    """What every task shows the model: the prompt to answer now plus turn bookkeeping."""

    task: str = Field(description="Task name, selects the observation/state class on the client")
    prompt_id: str | None = Field(default=None, description="Stable prompt id, None for ad-hoc prompt text")
    prompt: str = Field(description="Text to show the model for its next turn (multi-turn tasks include history)")
    turn: int = Field(default=0, ge=0, description="Turns taken so far in this episode")
    max_turns: int = Field(default=1, ge=1, description="Turn limit of this episode")
    feedback: str = Field(default="", description="Human-readable result of the last turn")


class TaskState(State):
    """Episode bookkeeping every task reports at `/state` (OpenEnv's `State` allows extra fields)."""

    task: str | None = Field(default=None, description="Task of the current episode, None before reset")
    prompt_id: str | None = Field(default=None, description="Prompt of the current episode")
    max_turns: int = Field(default=1, ge=1)
    done: bool = Field(default=False, description="Whether the current episode is over")
    episode_return: float = Field(default=0.0, description="Sum of the rewards of this episode so far")
