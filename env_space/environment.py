"""The OpenEnv `Environment` that OpenEnv's server runs once per session: one episode of any registered task.

Owns `TaskEnvironment`. OpenEnv's `HTTPEnvServer` creates one instance per WebSocket session (and a throw-away one
per stateless HTTP call), enforces the session cap and reaps idle sessions; this class only turns reset options and
actions into `Task` calls. The task is chosen at reset (`reset(task="letter", prompt_id=..., seed=...)`, default
configured per server), so one app, one `/ws` and one `EnvClient` serve every task, while each task keeps its own typed
observation and state classes. It also implements OpenEnv's optional task-provider methods, so OpenEnv's
`/dws/splits` and `/dws/tasks` routes list the same prompts as `/v1/tasks/{task}/prompts` (split = task name).
"""

from __future__ import annotations

import uuid
from typing import Any

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import EnvironmentMetadata
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from env_space import tasks
from env_space.errors import EnvInputError, describe_validation_errors
from env_space.metrics import Metrics
from env_space.models import MAX_PROMPT_ID_CHARS, TaskObservation, TaskState, TextAction
from env_space.tasks.base import Episode, Task

ENV_NAME = "dws"


class ResetOptions(BaseModel):
    """Everything `reset` accepts. Validated here because OpenEnv passes WebSocket reset data through unchecked."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(default=None, description="Picks the prompt deterministically")
    episode_id: str | None = Field(default=None, max_length=255)
    task: str | None = Field(default=None, max_length=64, description="Task name; the server default if omitted")
    prompt_id: str | None = Field(default=None, max_length=MAX_PROMPT_ID_CHARS, description="Exact prompt")


def task_or_error(name: str, *, loc: tuple[str | int, ...] = ("task",), status_code: int = 422) -> Task:
    task = tasks.get(name)
    if task is None:
        raise EnvInputError(f"unknown task {name!r}; available: {', '.join(tasks.names())}",
                            status_code=status_code, loc=loc)
    return task


def prompt_or_error(task: Task, prompt_id: str, *, loc: tuple[str | int, ...] = ("prompt_id",)):
    prompt = task.prompt(prompt_id)
    if prompt is None:
        raise EnvInputError(f"unknown prompt_id {prompt_id!r} for task {task.name!r}", loc=loc)
    return prompt


class TaskEnvironment(Environment[TextAction, TaskObservation, TaskState]):
    """One session's episode. Construct with keyword options only; OpenEnv calls it through a `functools.partial`."""

    # Each instance holds only its own episode; tasks are immutable and shared.
    SUPPORTS_CONCURRENT_SESSIONS = True
    # Hazard: OpenEnv otherwise gives every session its own ThreadPoolExecutor (a thread per session at 256+
    # sessions) just to construct and close this trivially cheap object; one shared worker is enough.
    REQUIRES_SINGLE_THREAD_EXECUTOR = True

    def __init__(self, *, default_task: str = "wordle", metrics: Metrics | None = None) -> None:
        super().__init__()
        self._default_task = default_task
        self._metrics = metrics
        self._task: Task | None = None
        self._episode: Episode | None = None
        self._episode_id: str | None = None
        self._closed = False

    # ---- OpenEnv API -----------------------------------------------------------------------------------------
    # `self` (and `action`) are positional-only: OpenEnv forwards every extra field of a reset/step request as a
    # keyword, and a field named "self" would otherwise be a TypeError, i.e. a 500 on the HTTP routes.
    def reset(self, /, seed: int | None = None, episode_id: str | None = None, **kwargs: Any) -> TaskObservation:
        self._check_open()
        try:
            opts = ResetOptions(seed=seed, episode_id=episode_id, **kwargs)
        except ValidationError as e:
            raise EnvInputError(f"invalid reset options: {describe_validation_errors(e.errors())}") from None
        except TypeError as e:  # a non-string key cannot reach here from JSON, but never let it become a 500
            raise EnvInputError(f"invalid reset options: {e}") from None
        task = task_or_error(opts.task or self._default_task)
        prompt = prompt_or_error(task, opts.prompt_id) if opts.prompt_id is not None else task.pick(seed=opts.seed)
        self._begin(task, task.new_episode(prompt), opts.episode_id)
        return task.observation(self._episode, reward=None)

    def step(self, action: TextAction, /, timeout_s: float | None = None, **kwargs: Any) -> TaskObservation:
        self._check_open()
        episode = self._episode
        if action.prompt_id is not None and (episode is None or episode.done):
            task_name = action.prompt_id.split(":", 1)[0]
            task = task_or_error(task_name, loc=("action", "prompt_id"))
            prompt = prompt_or_error(task, action.prompt_id, loc=("action", "prompt_id"))
            self._begin(task, task.new_episode(prompt), None)
        elif episode is None:
            raise EnvInputError("no episode in progress: reset first (or give action.prompt_id to score one "
                                "completion statelessly)", status_code=409, loc=("action",))
        elif episode.done:
            raise EnvInputError("the episode is over: reset to start another", status_code=409, loc=("action",))
        elif action.prompt_id is not None and action.prompt_id != episode.prompt.prompt_id:
            raise EnvInputError(f"action.prompt_id {action.prompt_id!r} is not the prompt of the episode in "
                                f"progress ({episode.prompt.prompt_id!r})", status_code=409,
                                loc=("action", "prompt_id"))
        task, episode = self._task, self._episode
        assert task is not None and episode is not None
        outcome = task.step(episode, action.text)
        if self._metrics is not None:
            self._metrics.record_step(task.name, outcome.reward,
                                      episode_return=episode.episode_return if episode.done else None)
        return task.observation(episode, reward=outcome.reward)

    # Overriding the async variants makes OpenEnv await them on the event loop instead of hopping to a thread per
    # call: a turn is a few microseconds of pure Python, bounded by the action's max_length.
    async def reset_async(self, /, seed: int | None = None, episode_id: str | None = None,
                          **kwargs: Any) -> TaskObservation:
        return self.reset(seed=seed, episode_id=episode_id, **kwargs)

    async def step_async(self, action: TextAction, /, timeout_s: float | None = None,
                         **kwargs: Any) -> TaskObservation:
        return self.step(action, timeout_s=timeout_s, **kwargs)

    @property
    def state(self) -> TaskState:
        if self._task is None or self._episode is None:
            return TaskState(episode_id=self._episode_id, step_count=0)
        return self._task.state(self._episode, episode_id=self._episode_id)

    def close(self) -> None:
        # OpenEnv's idle reaper closes the environment but leaves the WebSocket open; remembering it lets the next
        # message get a clear "expired" error instead of silently playing on outside the session cap.
        self._closed = True

    def get_metadata(self) -> EnvironmentMetadata:
        return EnvironmentMetadata(
            name=ENV_NAME,
            description="dws env_space: " + "; ".join(f"{t.name}: {t.description}" for t in tasks.all_tasks()),
            version="0.1.0",
        )

    # ---- OpenEnv task-provider protocol (split = task name) --------------------------------------------------
    def list_splits(self) -> list[str]:
        return list(tasks.names())

    def list_tasks(self, split: str) -> list[dict[str, Any]]:
        return [_prompt_view(p) for p in self._split(split).prompts]

    def num_tasks(self, split: str) -> int:
        return len(self._split(split).prompts)

    def get_task(self, split: str, index: int) -> dict[str, Any]:
        prompts = self._split(split).prompts
        if not 0 <= index < len(prompts):
            raise IndexError(index)  # OpenEnv answers 400 "Invalid task index"
        return _prompt_view(prompts[index])

    def get_task_range(self, split: str, start: int | None = None, stop: int | None = None) -> list[dict]:
        return [_prompt_view(p) for p in self._split(split).prompts[start:stop]]

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _split(self, split: str) -> Task:
        return task_or_error(split, loc=("body", "split"), status_code=404)

    def _begin(self, task: Task, episode: Episode, episode_id: str | None) -> None:
        self._task, self._episode = task, episode
        self._episode_id = episode_id or uuid.uuid4().hex

    def _check_open(self) -> None:
        if self._closed:
            raise EnvInputError("this session has expired (idle longer than the session timeout) or was closed; "
                                "open a new session", status_code=410)


def _prompt_view(p) -> dict[str, Any]:
    return {"prompt_id": p.prompt_id, "prompt": p.text}
