"""Clients for env_space: OpenEnv's own `EnvClient` for episodes, and a small HTTP client for batch scoring.

Owns `DwsEnvClient` and `ScoringClient`. `DwsEnvClient` subclasses OpenEnv's `EnvClient` unchanged -- it only says
how to encode a `TextAction` and which typed observation/state class to parse a payload into (chosen by the
payload's `task`, via the task registry). `ScoringClient` wraps `/v1/tasks`, `/v1/tasks/{task}/prompts` and
`/v1/score` with httpx. Both send the API key as a bearer token. Importing this module needs no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
from openenv.core.client_types import StepResult
from openenv.core.env_client import EnvClient
from pydantic import ValidationError
from typing_extensions import Self

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


class ScoringClient:
    """Synchronous HTTP client for the `/v1` routes (one pooled connection set; use as a context manager)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_auth_headers(api_key), timeout=timeout_s)

    def tasks(self) -> list[dict[str, Any]]:
        return self._get("/v1/tasks")["tasks"]

    def prompts(self, task: str, *, n: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("n", n), ("seed", seed)) if v is not None}
        return self._get(f"/v1/tasks/{task}/prompts", params=params)["prompts"]

    def score(self, task: str, items: Iterable[dict[str, Any]], *, detail: bool = False) -> dict[str, Any]:
        """`items`: dicts with `completion` and `prompt_id` (or `prompt`); returns the `/v1/score` response."""
        resp = self._http.post("/v1/score", json={"task": task, "items": list(items), "detail": detail})
        _raise_for_status(resp)
        return resp.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, **kwargs: Any) -> dict[str, Any]:
        resp = self._http.get(path, **kwargs)
        _raise_for_status(resp)
        return resp.json()


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        message = resp.json().get("message") or resp.json().get("detail")
    except ValueError:
        message = resp.text[:200]
    raise httpx.HTTPStatusError(f"{resp.status_code} from {resp.request.url.path}: {message}",
                                request=resp.request, response=resp)
