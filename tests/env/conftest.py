"""Fixtures for env_space tests: real `python -m env_space` servers on free loopback ports (no mocks).

Each server is a subprocess started exactly as the Space starts it (flags plus environment variables), waited on
through `/health`, and killed at the end of the session; its log is printed if it fails to come up. The inherited
environment is scrubbed of DWS_* and PORT so a developer's shell cannot change what the tests see.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dws_testing import NotHealthy, free_port, wait_healthy
from env_helpers import API_KEY, REPO


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    api_key: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _launch(tmp_dir: Path, *, args: list[str], env: dict[str, str]) -> Server:
    port = free_port()
    log = tmp_dir / "server.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DWS_") and k != "PORT"}
    full_env = {**clean, "PORT": str(port), "DWS_HOST": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False", **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "env_space", *args], cwd=REPO, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT)
    return Server(url=f"http://127.0.0.1:{port}", proc=proc, log=log, api_key=env.get("DWS_API_KEY"))


def _wait_ready(server: Server, timeout_s: float = 120.0) -> None:
    try:
        wait_healthy(server.url, proc=server.proc, timeout=timeout_s, what="env_space", interval=0.2,
                     log_tail=server.log_text)
    except NotHealthy as exc:
        raise RuntimeError(str(exc)) from None


def _stop(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(timeout=5)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory) -> Iterator:
    """Factory: start a server with CLI args and env vars; every server started is stopped at session end."""
    started: list[Server] = []

    def start(name: str, *, args: list[str] = (), env: dict[str, str] | None = None) -> Server:
        server = _launch(tmp_path_factory.mktemp(name), args=list(args), env=dict(env or {}))
        started.append(server)
        _wait_ready(server)
        return server

    yield start
    for s in started:
        _stop(s)


@pytest.fixture(scope="session")
def main_server(start_server) -> Server:
    """Open server with the UI, room for the load test, long session timeout."""
    return start_server("main", args=["--max-sessions", "400"], env={"DWS_SESSION_TIMEOUT": "120"})


@pytest.fixture(scope="session")
def strict_server(start_server) -> Server:
    """API key, 4 sessions, 2 s idle timeout, 4 KiB bodies -- configured through environment variables only."""
    return start_server("strict", env={
        "DWS_API_KEY": API_KEY,
        "DWS_MAX_SESSIONS": "4",
        "DWS_SESSION_TIMEOUT": "2",
        "DWS_MAX_BODY_BYTES": "4096",
        "DWS_UI": "false",
    })
