"""Run the three Spaces as local child processes: what `make demo` and the end-to-end test share.

Owns `ServiceSpec` (which Space, its production command, environment, port), `LocalService` (one started child in
its own process group, with a parent-death signal, a log file and a `/health` wait that reports progress) and `Stack`
(a context manager that stops every child it started -- whole process groups, newest first -- on normal exit, on an
error, on Ctrl-C and on SIGTERM). Each Space runs from its own virtualenv (`.venv/<space>`, docs/design.md §2) with the
same `python -m <space>` command its Docker image runs.

Operator/developer tooling: never shipped in a Space image. Standard library + httpx + `shared.proc`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from shared.errors import DwsError
from shared.proc import NotHealthy, child_preexec, free_port, port_free, probe_health, stop_process_group, wait_healthy

__all__ = ["REPO", "SPACE_MODULES", "LaunchError", "LocalService", "ServiceSpec", "Stack", "free_port", "port_free",
           "space_python", "stop_process_group"]

REPO = Path(__file__).resolve().parents[1]
SPACE_MODULES = {"env": "env_space", "rollout": "rollout_space", "trainer": "trainer_space"}


class LaunchError(DwsError):
    """A service could not be started (missing venv, port taken, crashed or never healthy during start-up)."""


def space_python(space: str, venv_root: Path) -> Path:
    py = Path(venv_root) / space / "bin" / "python"
    if not py.exists():
        raise LaunchError(f"no virtualenv for the {space} Space at {py.parent.parent} "
                          f"(build it with `tools/mkvenv.sh {space}` or `make venvs`)")
    return py


@dataclass(kw_only=True)
class ServiceSpec:
    """One service to start: `python -m <space's module> *args` from `.venv/<space>`, listening on `port`."""

    name: str  # shown in logs and the summary: "env", "rollout-1", "trainer"
    space: str  # "env" | "rollout" | "trainer"
    args: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    health_timeout_s: float = 600.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalService:
    """A started child. Its process group is its own, so stopping it also stops what it started (vLLM's engine)."""

    def __init__(self, spec: ServiceSpec, *, venv_root: Path, log_dir: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.url = spec.url
        self.log = Path(log_dir) / f"{spec.name}.log"
        self.started_at: float | None = None
        self.healthy_after_s: float | None = None
        self.proc: subprocess.Popen | None = None
        self._python = space_python(spec.space, venv_root)

    def start(self) -> None:
        cmd = [str(self._python), "-m", SPACE_MODULES[self.spec.space], *self.spec.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.spec.env)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        with open(self.log, "w") as out:
            # PDEATHSIG fires when the *thread* that forked exits: start services from the main thread only.
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=child_preexec)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if not self.alive():
            rc = None if self.proc is None else self.proc.returncode
            raise LaunchError(f"{self.name} exited (code {rc}); last lines of {self.log}:\n{self.tail()}")

    def wait_healthy(self, *, progress: Callable[[str], None] | None = None, every_s: float = 10.0) -> float:
        """Block until GET /health answers 200; returns the seconds since start. Raises LaunchError if the child
        exits first or the deadline passes (its log tail in the message)."""
        assert self.started_at is not None, "start() first"
        remaining = self.spec.health_timeout_s - (time.monotonic() - self.started_at)
        try:
            wait_healthy(self.url, proc=self.proc, timeout=remaining, what=self.name, progress=progress,
                         every_s=every_s, log_tail=lambda: f"last lines of {self.log}:\n{self.tail()}")
        except NotHealthy as exc:
            raise LaunchError(str(exc)) from None
        self.poll_healthy()
        return self.healthy_after_s

    def poll_healthy(self) -> bool:
        """One GET /health probe, for callers that watch a starting service while doing other work; the first 200
        records `healthy_after_s`."""
        ok = probe_health(self.url)
        if ok and self.healthy_after_s is None:
            self.healthy_after_s = time.monotonic() - self.started_at
        return ok

    def status(self, *, timeout: float = 30, token: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(f"{self.url}/status", timeout=timeout, headers=headers)
        r.raise_for_status()
        return r.json()

    def stop(self, *, timeout: float = 30) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=timeout)


class Stack:
    """Start services and guarantee they stop: `with Stack(...) as stack: svc = stack.start(spec)`.

    SIGTERM is turned into KeyboardInterrupt while the stack is open, so `kill <demo>` cleans up like Ctrl-C."""

    def __init__(self, *, venv_root: Path, log_dir: Path) -> None:
        self.venv_root = Path(venv_root)
        self.log_dir = Path(log_dir)
        self.services: list[LocalService] = []
        self._old_term = None

    def __enter__(self) -> "Stack":
        if threading.current_thread() is threading.main_thread():
            def _term(signum, frame):
                raise KeyboardInterrupt
            self._old_term = signal.signal(signal.SIGTERM, _term)
        return self

    def start(self, spec: ServiceSpec) -> LocalService:
        svc = LocalService(spec, venv_root=self.venv_root, log_dir=self.log_dir)
        svc.start()
        self.services.append(svc)
        return svc

    def stop_all(self) -> None:
        # Ctrl-C twice must not leave half of the children behind: finish stopping with SIGINT ignored.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN) if threading.current_thread() is threading.main_thread() else None
        try:
            for svc in reversed(self.services):
                svc.stop()
        finally:
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)

    def __exit__(self, *exc) -> None:
        self.stop_all()
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
