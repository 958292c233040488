"""The typed episode client for env_space: OpenEnv's own `EnvClient`.

Owns `DwsEnvClient`, which subclasses OpenEnv's `EnvClient` unchanged -- it only says how to encode a `TextAction`
and which typed observation/state class to parse a payload into (chosen by the payload's `task`, via the task
registry); it sends the API key as a bearer token. Importing this module needs no torch. Batch scoring (`/v1/score`)
has one client, the trainer's (`trainer_space.remote.EnvPool`): the trainer image does not ship env_space.
"""

from __future__ import annotations

from typing import Any

from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from pydantic import ValidationError

from env_space import tasks
from env_space.models import TaskObservation, TaskState, TextAction


def _auth_headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def _parse_typed(payload: dict[str, Any], kind: str, base: type) -> Any:
    task = tasks.get(str(payload.get("task")))
    cls = getattr(task, kind) if task is not None else base
    try:
        return cls.model_validate(payload)
    except ValidationError:
        # A newer server may add fields this client does not know; keep the common ones rather than fail.
        known = {k: v for k, v in payload.items() if k in base.model_fields}
        return base.model_validate(known)


class DwsEnvClient(EnvClient[TextAction, TaskObservation, TaskState]):
    """WebSocket session client: `reset(task=..., seed=... | prompt_id=...)`, then `step(TextAction | str)`.

    Example::

        with DwsEnvClient(base_url="http://127.0.0.1:7860").sync() as env:
            result = env.reset(task="wordle", seed=3)
            while not result.done:
                result = env.step("[crane]")
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, **kwargs: Any) -> None:
        headers = {**(_auth_headers(api_key) or {}), **(kwargs.pop("headers", None) or {})}
        super().__init__(base_url=base_url, headers=headers or None, **kwargs)

    def _step_payload(self, action: TextAction | str) -> dict[str, Any]:
        if isinstance(action, str):
            action = TextAction(text=action)
        return action.model_dump(exclude_none=True, exclude_defaults=True)

    def _parse_result(self, payload: dict[str, Any]) -> StepResult[TaskObservation]:
        obs = dict(payload.get("observation", {}))
        obs["reward"] = payload.get("reward")
        obs["done"] = payload.get("done", False)
        observation = _parse_typed(obs, "observation_cls", TaskObservation)
        return StepResult(observation=observation, reward=payload.get("reward"), done=bool(payload.get("done")),
                          metadata=payload.get("metadata"))

    def _parse_state(self, payload: dict[str, Any]) -> TaskState:
        return _parse_typed(payload, "state_cls", TaskState)
