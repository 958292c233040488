"""Server configuration: CLI flags with environment-variable fallbacks of the same names (docs/design.md §6).

Owns `ServerConfig` and `parse_config`. Every flag `--foo-bar` falls back to the variable `DWS_FOO_BAR`, except
`--port`, which reads `PORT` (the variable Hugging Face Spaces set); a flag on the command line wins over the
environment. Values from the environment go through the same type checks as flags, so a bad Space variable stops the
server at startup naming the variable. The API key is kept out of `repr` and of `describe()`:
it must never reach a log.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from env_space import tasks


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 7860
    max_sessions: int = 512
    session_timeout: float | None = 300.0  # seconds idle before OpenEnv reaps a session; None = never
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 1 << 20
    default_task: str = "wordle"
    ui: bool = True
    log_level: str = "info"
    access_log: bool = False

    def describe(self) -> str:
        """The startup log line: tasks, address and limits; says whether auth is on, never the key."""
        timeout = f"{self.session_timeout:g}s" if self.session_timeout else "off"
        return (f"env_space serving tasks [{', '.join(tasks.names())}] (default {self.default_task}) on "
                f"http://{self.host}:{self.port} | max_sessions={self.max_sessions} session_timeout={timeout} "
                f"max_body={self.max_body_bytes}B auth={'on' if self.api_key else 'off'} "
                f"ui={'on' if self.ui else 'off'}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


def _timeout(text: str) -> float | None:
    value = float(text)
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise ValueError("must be a finite number >= 0 (0 disables expiry)")
    return value or None


def _boolean(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true/false")


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse quotes the type's __name__ in its error message
    return fn


# flag, environment variable, type, default, help
_OPTIONS: tuple[tuple[str, str, Callable, str, str], ...] = (
    ("--host", "DWS_HOST", str, "0.0.0.0", "interface to bind"),
    ("--port", "PORT", _named(_port, "port"), "7860", "TCP port (Spaces set PORT)"),
    ("--max-sessions", "DWS_MAX_SESSIONS", _named(_positive_int, "positive int"), "512",
     "concurrent OpenEnv sessions; more are refused with 429"),
    ("--session-timeout", "DWS_SESSION_TIMEOUT", _named(_timeout, "seconds"), "300",
     "seconds an idle session lives (0 = forever); reaped within max(timeout/4, 5s) after"),
    ("--api-key", "DWS_API_KEY", str, "", "bearer token required on every route except /health (empty = open)"),
    ("--max-body-bytes", "DWS_MAX_BODY_BYTES", _named(_positive_int, "positive int"), str(1 << 20),
     "largest HTTP body / WebSocket message accepted; larger is 413"),
    ("--default-task", "DWS_DEFAULT_TASK", str, "wordle", "task of a reset that names none"),
    ("--ui", "DWS_UI", _named(_boolean, "boolean"), "true", "mount the Gradio status page at /"),
    ("--log-level", "DWS_LOG_LEVEL", str, "info", "debug, info, warning, error"),
    ("--access-log", "DWS_ACCESS_LOG", _named(_boolean, "boolean"), "false", "log every request (costly under load)"),
)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m env_space",
        description="dws env_space: OpenEnv environment server (Wordle and small learnable tasks) with batch scoring.",
    )
    for flag, var, conv, default, text in _OPTIONS:
        if var in environ:
            try:
                conv(environ[var])
            except (TypeError, ValueError) as e:
                parser.error(f"environment variable {var}={environ[var]!r}: {e}")
        # A string default goes through `type` like a command-line value.
        parser.add_argument(flag, type=conv, default=environ.get(var, default), metavar=var,
                            help=f"{text} [env {var}, default {default or 'unset'}]")
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    ns = parser.parse_args(argv)
    if ns.default_task not in tasks.names():
        parser.error(f"--default-task/DWS_DEFAULT_TASK: unknown task {ns.default_task!r}; "
                     f"choose from {', '.join(tasks.names())}")
    if ns.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        parser.error(f"--log-level/DWS_LOG_LEVEL: unknown level {ns.log_level!r}")
    return ServerConfig(
        host=ns.host,
        port=ns.port,
        max_sessions=ns.max_sessions,
        session_timeout=ns.session_timeout,
        api_key=ns.api_key or None,
        max_body_bytes=ns.max_body_bytes,
        default_task=ns.default_task,
        ui=ns.ui,
        log_level=ns.log_level.lower(),
        access_log=ns.access_log,
    )
