"""Subprocess helpers for the trainer suite: a real env_space server and a real rollout gateway (vLLM on CPU), each
started from its own Space's venv exactly as its image would run it (DESIGN.md §2). Nothing is mocked."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from dws_testing import REPO, free_port

TOKEN = "test-token-trainer"
ROLLOUT_PY = REPO / ".venv" / "rollout" / "bin" / "python"
ENV_PY = REPO / ".venv" / "env" / "bin" / "python"


class Service:
    """A child process serving HTTP on 127.0.0.1; waits for GET /health, stops by process group."""

    def __init__(self, cmd: list[str], *, log: Path, env: dict | None = None, timeout: float = 600) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [c.replace("{PORT}", str(self.port)) for c in cmd]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise AssertionError(f"{cmd[2]} never became healthy\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def status(self) -> dict:
        return httpx.get(f"{self.url}/status", timeout=30).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_env(logdir: Path) -> Service:
    return Service([str(ENV_PY), "-m", "env_space", "--host", "127.0.0.1", "--port", "{PORT}"],
                   log=logdir / "env.log", env={"DWS_UI": "false"})


def start_gateway(model: Path, bucket: Path, logdir: Path, *, poll_interval: float = 600) -> Service:
    """A replica that only moves when nudged (huge poll interval), so tests control its lag."""
    return Service([str(ROLLOUT_PY), "-m", "rollout_space", "--model", str(model), "--bucket", str(bucket),
                    "--host", "127.0.0.1", "--port", "{PORT}", "--poll-interval", str(poll_interval),
                    "--max-model-len", "512", "--no-ui", "--vllm-log", str(logdir / "vllm.log"),
                    "--vllm-args=--enforce-eager"],
                   log=logdir / "gateway.log",
                   env={"DWS_API_KEY": TOKEN, "VLLM_CACHE_ROOT": str(logdir / "vllm-cache")})
