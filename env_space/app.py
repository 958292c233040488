"""Assembles the env_space ASGI app: OpenEnv's server for episodes, `/v1` for scoring, `/status`, the UI, the guard.

Owns `build_app`. OpenEnv's `create_fastapi_app` is `FastAPI()` + `HTTPEnvServer(...)` + `register_routes`; we make
those same calls ourselves (rather than via `create_app`, which hides the server object and may swap in its
playground UI from an environment variable) because `/status` and the guard's 429 need the server's live session
count. Everything session-related -- creation, the cap, idle expiry, `/reset` `/step` `/state` `/schema` `/ws` -- is
OpenEnv's, configured through `ConcurrencyConfig`.

Error contract: bad input is 4xx with a JSON body (`detail` list plus a one-line `message`); nothing a client sends
may produce a 500. Validation errors are re-rendered without echoing input (which may be large or not JSON-safe).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from openenv.core.env_server.http_server import HTTPEnvServer
from openenv.core.env_server.types import ConcurrencyConfig
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from env_space import tasks
from env_space.config import ServerConfig
from env_space.environment import ENV_NAME, TaskEnvironment
from env_space.errors import EnvInputError, describe_validation_errors
from env_space.guard import Guard
from env_space.metrics import Metrics
from env_space.models import TaskObservation, TaskState, TextAction
from env_space.v1 import build_router

log = logging.getLogger("env_space")


class SafeJSONResponse(JSONResponse):
    """JSON error body that always encodes: ASCII-escaped (a lone surrogate echoed from the request would make
    Starlette's UTF-8 rendering raise, i.e. a 500) and `str()` for anything json cannot represent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str, separators=(",", ":")).encode()


class SessionStatus(BaseModel):
    active: int
    max: int
    timeout_s: float | None


class StatusResponse(BaseModel):
    service: str
    tasks: list[str]
    default_task: str
    auth: bool
    sessions: SessionStatus
    metrics: dict[str, Any]


def build_app(config: ServerConfig) -> FastAPI:
    metrics = Metrics()
    factory = functools.partial(TaskEnvironment, default_task=config.default_task, metrics=metrics)
    app = FastAPI(
        title="dws env_space",
        version="0.1.0",
        description=(
            "OpenEnv environment server for dws. Episodes: OpenEnv's `/reset`, `/step`, `/state`, `/schema` and the "
            "`/ws` session (choose the task at reset: `{\"task\": \"wordle\", \"seed\": 1}`). Trainer throughput: "
            "`/v1/tasks`, `/v1/tasks/{task}/prompts`, `POST /v1/score`. Live numbers: `/status`."
        ),
    )
    server = HTTPEnvServer(
        factory,
        TextAction,
        TaskObservation,
        concurrency_config=ConcurrencyConfig(max_concurrent_envs=config.max_sessions,
                                             session_timeout=config.session_timeout),
        env_name=ENV_NAME,
        state_cls=TaskState,
    )
    server.register_routes(app)
    app.include_router(build_router(metrics=metrics))

    def status() -> dict[str, Any]:
        return StatusResponse(
            service="env_space",
            tasks=list(tasks.names()),
            default_task=config.default_task,
            auth=config.api_key is not None,
            sessions=SessionStatus(active=server.active_sessions, max=server.max_concurrent_envs,
                                   timeout_s=config.session_timeout),
            metrics=metrics.snapshot(tasks.names()),
        ).model_dump()

    @app.get("/status", response_model=StatusResponse, tags=["Health"], summary="Sessions, rates, mean rewards")
    async def get_status() -> dict[str, Any]:
        return status()

    _install_error_handlers(app)
    app.add_middleware(
        Guard,
        api_key=config.api_key,
        max_body_bytes=config.max_body_bytes,
        capacity=lambda: (server.active_sessions, server.max_concurrent_envs),
        metrics=metrics,
    )
    app.state.env_server = server
    app.state.metrics = metrics
    app.state.status = status
    if config.ui:
        from env_space.ui import mount_ui

        mount_ui(app, status=status)  # last: the mount at "/" must not shadow any API route
    else:
        @app.get("/", include_in_schema=False)
        async def root() -> dict[str, Any]:
            return status()
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EnvInputError)
    async def env_input_error(_: Request, exc: EnvInputError) -> JSONResponse:
        return SafeJSONResponse(exc.to_detail(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Re-rendered without `input`/`ctx`: they echo the request (possibly large) and may hold non-JSON objects.
        errors = [{"loc": [x if isinstance(x, int) else str(x) for x in e.get("loc", ())],
                   "msg": str(e.get("msg", "invalid")), "type": str(e.get("type", "value_error"))}
                  for e in exc.errors()]
        return SafeJSONResponse({"detail": errors, "message": describe_validation_errors(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # OpenEnv raises HTTPException(422, detail=<pydantic errors>) for a bad action; SafeJSONResponse copes with
        # whatever those errors echo back.
        body: dict[str, Any] = {"detail": exc.detail}
        if isinstance(exc.detail, list) and exc.detail and isinstance(exc.detail[0], dict):
            body["message"] = describe_validation_errors(exc.detail)
        return SafeJSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error (a bug: no input should reach this)")
        return SafeJSONResponse({"detail": "internal error"}, status_code=500)
