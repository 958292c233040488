"""Child-process hygiene for every dws process that starts another: the replica's gateway (its vLLM child), the local
launcher behind `make demo`, and the test suites.

Owns the four things each of them must get right, once: a free loopback port (`free_port`, `port_free`), a child in
its own process group that dies with its parent (`child_preexec`), stopping a whole group (`stop_process_group`,
`group_members`) and waiting for `GET /health` while watching the child (`wait_healthy`). The hazard they share is a
model-sized orphan: a vLLM engine core or worker left running after whatever started it crashed or was killed.

Standard library + httpx only, so it imports in any Space's venv.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import httpx

LOOPBACK = "127.0.0.1"


class NotHealthy(RuntimeError):
    """The child exited before it answered `/health`, or the deadline passed."""


def port_free(port: int, host: str = LOOPBACK) -> bool:
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
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def child_preexec() -> None:
    """`preexec_fn` for a child started with `start_new_session=True`: if the parent dies, even by SIGKILL, the
    kernel sends the child SIGTERM (Linux PR_SET_PDEATHSIG), so no model-sized service outlives what started it.
    It also gives the child every core: a CPU mask inherited from a pinned parent would confine a whole Space to one
    core, where a vLLM-CPU worker may already be spinning.

    PDEATHSIG fires when the *thread* that forked exits: fork from threads that live as long as the process."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(proc: subprocess.Popen, *, timeout: float) -> None:
    """SIGTERM the child's process group (it was started with start_new_session), wait, then SIGKILL whatever is
    left of the group -- also when the leader already exited, since its children (vLLM's engine core) may not have.
    Never raises: one leader stuck in the kernel after SIGKILL must not keep a caller from stopping the others."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass


def group_members(group: int) -> list[int]:
    """Live processes of a process group (Linux /proc), zombies excluded."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                out.append(int(d))
    return out


def probe_health(url: str, *, timeout: float = 5.0) -> bool:
    """One `GET {url}/health`; any transport error reads as "not yet"."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, *, proc: subprocess.Popen | None, timeout: float, what: str = "service",
                 interval: float = 0.5, progress: Callable[[str], None] | None = None, every_s: float = 10.0,
                 log_tail: Callable[[], str] | None = None) -> float:
    """Block until `GET {url}/health` answers 200 and return the seconds it took. Raises `NotHealthy` (with the
    child's log tail when given) as soon as `proc` exits, or when `timeout` passes -- a crashed child must not be
    waited on for the whole deadline."""
    t0 = time.monotonic()
    next_note = t0 + every_s
    while True:
        if proc is not None and proc.poll() is not None:
            tail = f"\n{log_tail()}" if log_tail else ""
            raise NotHealthy(f"{what} exited during start-up (exit code {proc.returncode}){tail}")
        if probe_health(url, timeout=min(5.0, max(1.0, interval * 4))):
            return time.monotonic() - t0
        now = time.monotonic()
        if now - t0 > timeout:
            tail = f"\n{log_tail()}" if log_tail else ""
            raise NotHealthy(f"{what} not healthy after {timeout:.0f}s{tail}")
        if progress and now >= next_note:
            progress(f"{what}: still starting ({now - t0:.0f}s)")
            next_note = now + every_s
        time.sleep(interval)
