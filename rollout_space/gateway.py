"""The rollout Space's public face: an OpenAI-compatible proxy in front of a loopback-only vLLM.

Only `/v1/completions`, `/v1/chat/completions` and `/v1/models` are forwarded; vLLM's dev/RL routes (/pause,
/update_weights, /collective_rpc, …) are never reachable through this app. Every completion is tagged with the model
version that produced it: header `X-DWS-Model-Version` and a `model_version` field (per chunk when streaming; a
response that spanned a sync also lists `model_versions`). Inference takes an optional bearer token (DWS_API_KEY);
the control endpoint `POST /sync` always requires it. `/health`, `/status` (JSON) and a Gradio page at `/` report
the replica's state. A supervisor restarts vLLM if it dies, and the replica catches up again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from shared.wire import MODEL_VERSION_FIELD, MODEL_VERSION_HEADER, MODEL_VERSIONS_FIELD

from rollout_space.sync import Syncer, warm_decoders
from rollout_space.vllm_proc import VllmServer

log = logging.getLogger("dws.rollout.gateway")

PROXIED = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")}
MAX_BODY_BYTES = 4 << 20
_SSE_EOL = re.compile(rb"\r\n|\r|\n")  # the only line ends Server-Sent Events know


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Split an SSE byte stream into lines (without their ends) at CRLF, CR or LF, wherever the chunks cut it.

    Not httpx's `aiter_lines`: it splits like `str.splitlines`, also at U+2028, U+0085, U+001C..., which vLLM's
    JSON carries unescaped inside generated text -- a data line cut there no longer parses, and the client gets it
    cut too. A stream that ends without a line end still yields its last line.
    """
    buf = bytearray()
    async for chunk in chunks:
        # What is held has no line end but perhaps a last CR: only that and the new chunk are searched (a long line
        # arriving in many chunks is not rescanned, nor copied whole, per chunk).
        scan = max(len(buf) - 1, 0)
        buf += chunk
        start = 0
        for m in _SSE_EOL.finditer(buf, scan):
            if m.end() == len(buf) and m.group() == b"\r":
                break  # may be the first half of a CRLF the next chunk completes
            yield bytes(buf[start:m.start()])
            start = m.end()
        del buf[:start]
    if buf:
        yield bytes(buf[:-1] if buf.endswith(b"\r") else buf)


@dataclass
class GatewayInfo:
    model: str
    bucket: str
    api_key: str | None = None
    started: float = field(default_factory=time.time)
    requests: int = 0
    failed_requests: int = 0
    in_flight: int = 0
    unavailable: int = 0  # the gateway's own 503s (vLLM starting / restarting / failed): failures a client saw
    max_n: int = 64  # completions per request; vLLM would accept thousands, each holding KV memory
    vllm_state: str = "starting"  # starting | ready | restarting | failed


def _bearer_ok(request: Request, key: str | None) -> bool:
    if not key:
        return False
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _err(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status, **extra}}, status_code=status)


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds `limit`: a chunked upload declares no length, and buffering it whole
    before measuring would let one client fill the replica's memory."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(*, info: GatewayInfo, server: VllmServer | None, syncer: Syncer, supervise: bool = True) -> FastAPI:
    upstream = httpx.AsyncClient(base_url=server.base_url if server else "http://127.0.0.1:1",
                                 timeout=httpx.Timeout(None, connect=10))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(_boot_and_sync(), name="dws-sync")]
        if supervise and server is not None:
            tasks.append(asyncio.create_task(_supervise(), name="dws-supervisor"))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.aclose()
            await syncer.control.aclose()

    async def _boot_and_sync():
        warm = asyncio.create_task(asyncio.to_thread(warm_decoders))  # while vLLM loads
        if server is not None and info.vllm_state == "starting":
            try:
                await asyncio.to_thread(server.wait_healthy)
                info.vllm_state = "ready"
            except Exception as exc:  # noqa: BLE001
                info.vllm_state = "failed"
                log.error("vLLM failed to start: %s", exc)
                return
        await warm
        await syncer.identify()
        await syncer.run()

    # One long-lived thread does every vLLM restart (see VllmServer.start: the child's parent-death signal is tied
    # to the thread that spawned it, so a pool thread that may exit must not spawn it).
    restarter = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dws-vllm-restart")

    async def _supervise():
        while True:
            await asyncio.sleep(1.0)
            if info.vllm_state == "ready" and not server.alive():
                log.error("vLLM exited (code %s); restarting it", server.proc.returncode if server.proc else None)
                info.vllm_state = "restarting"
                syncer.forget_version()
                try:
                    await asyncio.get_running_loop().run_in_executor(restarter, server.restart)
                except Exception as exc:  # noqa: BLE001
                    log.error("vLLM restart failed: %s", exc)
                    info.vllm_state = "failed"
                    continue
                info.vllm_state = "ready"
                await syncer.identify()
                syncer.nudge()

    app = FastAPI(title="dws rollout gateway", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health():
        ok = info.vllm_state == "ready"
        body = {"status": "ok" if ok else info.vllm_state, "vllm": info.vllm_state,
                "served_version": syncer.state.served_version, "synced": syncer.state.served_version is not None}
        return JSONResponse(body, status_code=200 if ok else 503)

    def status_dict() -> dict:
        return {"model": info.model, "bucket": info.bucket, "vllm": info.vllm_state,
                "vllm_restarts": server.restarts if server else 0,
                "vllm_pid": server.proc.pid if server and server.proc else None, "uptime_s": round(time.time() - info.started, 1),
                "requests": info.requests, "failed_requests": info.failed_requests, "in_flight": info.in_flight,
                "unavailable_503": info.unavailable, "max_n": info.max_n,
                **syncer.status()}

    app.state.status = status_dict

    @app.get("/status")
    async def status():
        return status_dict()

    @app.post("/sync")
    async def sync_now(request: Request):
        if not info.api_key:
            return _err(403, "control endpoints are disabled: set DWS_API_KEY on this Space to enable them")
        if not _bearer_ok(request, info.api_key):
            return _err(401, "missing or wrong bearer token")
        syncer.nudge()
        return {"status": "sync requested", "served_version": syncer.state.served_version}

    async def _proxy(request: Request, path: str):
        if info.api_key and not _bearer_ok(request, info.api_key):
            return _err(401, "missing or wrong bearer token")
        if info.vllm_state != "ready":
            info.unavailable += 1
            return _err(503, f"vLLM is {info.vllm_state}; retry shortly", retry_after_s=5)
        body = b""
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                return _err(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            try:
                body = await _read_capped(request, MAX_BODY_BYTES)
            except ClientDisconnect:  # gone mid-body: nobody reads the answer, but it must not be a 500 + traceback
                return _err(400, "the client disconnected before sending the whole body")
            if body is None:
                return _err(413, f"request body larger than {MAX_BODY_BYTES} bytes")
            try:
                payload = json.loads(body or b"null")
            except ValueError:
                return _err(400, "request body must be JSON")
            if not isinstance(payload, dict):
                return _err(400, "request body must be a JSON object")
            n = payload.get("n", 1)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= info.max_n):
                return _err(400, f"n must be an integer from 1 to {info.max_n}, got {n!r}")
            stream = bool(payload.get("stream"))
        else:
            stream = False
        v_start = syncer.state.served_version
        info.requests += 1
        info.in_flight += 1
        headers = {"content-type": "application/json"}
        try:
            req = upstream.build_request(request.method, path, content=body or None, headers=headers,
                                         params=dict(request.query_params))
            resp = await upstream.send(req, stream=True)
        except httpx.HTTPError as exc:
            info.in_flight -= 1
            info.failed_requests += 1
            return _err(502, f"inference server unreachable: {type(exc).__name__}")
        if stream and resp.status_code == 200:
            return StreamingResponse(_relay_stream(resp, v_start), status_code=200, media_type="text/event-stream",
                                     headers={MODEL_VERSION_HEADER: str(v_start)})
        try:
            raw = await resp.aread()
        finally:
            await resp.aclose()
            info.in_flight -= 1
        v_end = syncer.state.served_version
        if resp.status_code >= 500:
            info.failed_requests += 1
        try:
            data = json.loads(raw)
        except ValueError:
            return Response(raw, status_code=resp.status_code, media_type=resp.headers.get("content-type"))
        if isinstance(data, dict) and resp.status_code == 200:
            data[MODEL_VERSION_FIELD] = v_end
            if v_start != v_end:
                data[MODEL_VERSIONS_FIELD] = [v_start, v_end]
        return JSONResponse(data, status_code=resp.status_code, headers={MODEL_VERSION_HEADER: str(v_end)})

    async def _relay_stream(resp: httpx.Response, v_start):
        seen = {v_start}
        try:
            async for line in sse_lines(resp.aiter_bytes()):
                if line.startswith(b"data: ") and line[6:].strip() not in (b"", b"[DONE]"):
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        chunk = None
                    if isinstance(chunk, dict):
                        v = syncer.state.served_version
                        seen.add(v)
                        chunk[MODEL_VERSION_FIELD] = v
                        if len(seen) > 1:
                            chunk[MODEL_VERSIONS_FIELD] = sorted(x for x in seen if x is not None)
                        # ensure_ascii: U+2028 & co. leave escaped, so a client splitting like splitlines() is safe
                        line = b"data: " + json.dumps(chunk, separators=(",", ":")).encode()
                yield line + b"\n"
        except httpx.HTTPError:
            info.failed_requests += 1
            yield b'data: {"error": {"message": "inference stream interrupted"}}\n\n'
        finally:
            await resp.aclose()
            info.in_flight -= 1

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def v1(rest: str, request: Request):
        path = "/v1/" + rest
        if (request.method, path) not in PROXIED:
            return _err(404, f"{request.method} {path} is not served by this gateway")
        return await _proxy(request, path)

    return app


def mount_ui(app: FastAPI, status_fn) -> FastAPI:
    """A small Gradio page at `/` showing the replica's status (refreshing every 2 s)."""
    import gradio as gr

    def render():
        s = status_fn()
        last = s.get("last_sync") or {}
        rows = [
            ("model", s["model"]), ("bucket", s["bucket"]), ("vLLM", s["vllm"]),
            ("served version", s["served_version"]), ("latest in bucket", s["latest_version"]), ("lag", s["lag"]),
            ("digest match", {True: "✓", False: "✗", None: "–"}[s["digest_match"]]),
            ("syncs / failures", f"{s['syncs']} / {s['failures']}"),
            ("last sync", last.get("plan", "–")),
            ("last pause", f"{last.get('pause_s', 0) * 1e3:.1f} ms" if last else "–"),
            ("last download", f"{last.get('download_s', 0):.3f} s, {last.get('bytes', 0):,} B" if last else "–"),
            ("requests (failed)", f"{s['requests']} ({s['failed_requests']})"),
        ]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    with gr.Blocks(title="dws rollout replica") as ui:
        gr.Markdown("# dws rollout replica\nA vLLM server that follows the trainer's bucket and applies each "
                    "delta in place.")
        table = gr.Markdown(render())
        gr.Timer(2.0).tick(render, outputs=table)
    return gr.mount_gradio_app(app, ui, path="/")
