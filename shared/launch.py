"""Run the three Spaces as local child processes: what `make demo` and the end-to-end test share.

Owns `ServiceSpec` (which Space, its production command, environment, port), `LocalService` (one started child in
its own process group, with a parent-death signal, a log file and a `/health` wait that reports progress) and `Stack`
(a context manager that stops every child it started -- whole process groups, newest first -- on normal exit, on an
error, on Ctrl-C and on SIGTERM). Each Space runs from its own virtualenv (`.venv/<space>`, DESIGN.md §2) with the
same `python -m <space>` command its Docker image runs.

Standard library + httpx only, so it imports in any Space's venv.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from shared.errors import DwsError

REPO = Path(__file__).resolve().parents[1]
SPACE_MODULES = {"env": "env_space", "rollout": "rollout_space", "trainer": "trainer_space"}


class LaunchError(DwsError):
    """A service could not be started (missing venv, port taken, crashed or never healthy during start-up)."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        # Without SO_REUSEADDR a port in TIME_WAIT from a previous run would read as taken; a live listener still
        # makes bind fail, which is the case that matters.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM the child's process group (it was started with start_new_session), wait, then SIGKILL whatever is
    left of the group -- also when the leader already exited, since its children (vLLM's engine core) may not have."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


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


def _die_with_parent() -> None:
    """Runs in the child before exec: if the orchestrator dies, even by SIGKILL, the kernel sends the child SIGTERM,
    so an interrupted demo never leaves a model-sized service running (Linux; elsewhere Stack's cleanup only).
    It also gives the child every core: a CPU mask inherited from a pinned parent would confine a whole Space to
    one core, where a vLLM-CPU worker may already be spinning."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
                                         start_new_session=True, preexec_fn=_die_with_parent)

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
        deadline = self.started_at + self.spec.health_timeout_s
        next_note = time.monotonic() + every_s
        while True:
            self.check_alive()
            if self.poll_healthy():
                return self.healthy_after_s
            now = time.monotonic()
            if now > deadline:
                raise LaunchError(f"{self.name} not healthy after {self.spec.health_timeout_s:.0f}s; "
                                  f"last lines of {self.log}:\n{self.tail()}")
            if progress and now >= next_note:
                progress(f"{self.name}: still starting ({now - self.started_at:.0f}s)")
                next_note = now + every_s
            time.sleep(0.5)

    def poll_healthy(self) -> bool:
        """One GET /health probe, for callers that watch a starting service while doing other work; the first 200
        records `healthy_after_s`."""
        try:
            ok = httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False
        if ok and self.healthy_after_s is None:
            self.healthy_after_s = time.monotonic() - self.started_at
        return ok

    def status(self, *, timeout: float = 30, token: str | None = None) -> dict:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(f"{self.url}/status", timeout=timeout, headers=headers)
        r.raise_for_status()
        return r.json()

    def stop(self, *, timeout: float = 30) -> None:
        if self.proc is None:
            return
        try:
            stop_process_group(self.proc, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass  # the group was SIGKILLed; one stuck leader must not keep the demo from stopping the others


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
