"""Trainer-throughput routes beside OpenEnv's: task listing, prompt listing with stable ids, batch scoring.

Owns `/v1/tasks`, `/v1/tasks/{task}/prompts` and `/v1/score` and their request/response models. GRPO scores whole
groups of single-turn completions at once; one POST of N completions replaces N WebSocket sessions. Scoring goes
through `Task.score`, i.e. the same `Task.step` an episode uses, so rewards are identical on both paths. Request sizes
are bounded by the models (items per batch, characters per completion) and by the guard's body limit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from env_space import tasks
from env_space.environment import prompt_or_error
from env_space.errors import EnvInputError
from env_space.metrics import Metrics
from env_space.models import MAX_COMPLETION_CHARS, MAX_PROMPT_ID_CHARS

MAX_BATCH = 4096
MAX_PROMPT_CHARS = 4096
MAX_LISTED_PROMPTS = 100_000

# The registry is fixed once the package is imported, so task names are a closed set in the OpenAPI schema: clients
# (and the schema fuzzer) see the valid values, and an unknown name is a 422 from validation.
TaskName = Literal[tasks.names()]  # type: ignore[valid-type]


class TaskInfo(BaseModel):
    name: str
    description: str
    answer_format: str
    multi_turn: bool
    max_turns: int
    reward_range: tuple[float, float] = Field(description="Bounds of the reward of one turn / one scored completion")
    num_prompts: int


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class PromptOut(BaseModel):
    prompt_id: str
    prompt: str


class PromptList(BaseModel):
    task: str
    count: int
    prompts: list[PromptOut]


class ScoreItem(BaseModel):
    """One completion to score, naming its prompt by stable id (preferred) or by text."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str | None = Field(default=None, max_length=MAX_PROMPT_ID_CHARS)
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS,
                                  description="Prompt text, for tasks that can read their target from it")
    completion: str = Field(max_length=MAX_COMPLETION_CHARS)

    @model_validator(mode="after")
    def _exactly_one_prompt(self) -> ScoreItem:
        if (self.prompt_id is None) == (self.prompt is None):
            raise ValueError("give exactly one of prompt_id or prompt")
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: TaskName  # type: ignore[valid-type]
    items: list[ScoreItem] = Field(min_length=1, max_length=MAX_BATCH)
    detail: bool = Field(default=False, description="Also return per-item feedback")


class ScoreResult(BaseModel):
    prompt_id: str | None = Field(default=None, description="Absent for prompts given as text")
    reward: float
    feedback: str


class ScoreResponse(BaseModel):
    task: str
    reward_range: tuple[float, float]
    rewards: list[float] = Field(description="One reward per item, in request order")
    results: list[ScoreResult] | None = Field(default=None, description="Present when detail=true")


def task_info(task: tasks.Task) -> TaskInfo:
    return TaskInfo(
        name=task.name,
        description=task.description,
        answer_format=task.answer_format,
        multi_turn=task.max_turns > 1,
        max_turns=task.max_turns,
        reward_range=task.reward_range,
        num_prompts=len(task.prompts),
    )


def build_router(*, metrics: Metrics) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["Trainer API"])

    @router.get("/tasks", response_model=TaskList, summary="List the served tasks")
    async def list_tasks() -> TaskList:
        return TaskList(tasks=[task_info(t) for t in tasks.all_tasks()])

    @router.get("/tasks/{task}/prompts", response_model=PromptList, summary="List a task's prompts with stable ids")
    async def list_prompts(
        task: Annotated[TaskName, Path(description="Task name")],  # type: ignore[valid-type]
        n: Annotated[int | None, Query(ge=1, le=MAX_LISTED_PROMPTS, description="How many (default all)")] = None,
        seed: Annotated[int | None, Query(ge=0, le=2**63 - 1,
                                          description="Seeded sample without repeats; list order without one")] = None,
    ) -> PromptList:
        t = tasks.get(task)
        assert t is not None  # TaskName admits registered names only
        chosen = t.sample(n=n, seed=seed)
        return PromptList(task=t.name, count=len(chosen),
                          prompts=[PromptOut(prompt_id=p.prompt_id, prompt=p.text) for p in chosen])

    @router.post("/score", response_model=ScoreResponse, response_model_exclude_none=True,
                 summary="Score many single-turn completions in one call")
    async def score(req: ScoreRequest) -> ScoreResponse:
        t = tasks.get(req.task)
        assert t is not None
        prompts = []
        for i, item in enumerate(req.items):
            if item.prompt_id is not None:
                prompts.append(prompt_or_error(t, item.prompt_id, loc=("body", "items", i, "prompt_id")))
            else:
                p = t.prompt_for_text(item.prompt)
                if p is None:
                    raise EnvInputError(f"task {t.name!r} cannot score prompt text it does not know; "
                                        "use prompt_id", loc=("body", "items", i, "prompt"))
                prompts.append(p)
        # Validate the whole batch before scoring any of it so a bad item never leaves half-counted metrics.
        outcomes = [t.score(p, item.completion) for p, item in zip(prompts, req.items)]
        rewards = [o.reward for o in outcomes]
        metrics.record_scores(t.name, rewards)
        results = None
        if req.detail:
            results = [ScoreResult(prompt_id=p.prompt_id, reward=o.reward, feedback=o.feedback)
                       for p, o in zip(prompts, outcomes)]
        return ScoreResponse(task=t.name, reward_range=t.reward_range, rewards=rewards, results=results)

    return router
