"""The trainer's HTTP server: `GET /health`, `GET /status` (JSON) and a Gradio dashboard at `/`.

Owns `build_status` (one JSON document: training, sync, replicas, bucket), `build_app` and `serve_in_background`
(uvicorn in a daemon thread so the training loop keeps the main thread). The page refreshes on a `gr.Timer` and shows
exactly what `/status` returns. Replica figures come from each replica's own `/status`; bucket figures from the
manifest. Nothing here can block training: every remote read has a short timeout and failures become fields.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from trainer_space.state import RunState

log = logging.getLogger("dws.trainer.dashboard")


def _bucket_view(bucket: str | None) -> dict[str, Any]:
    if not bucket:
        return {}
    try:
        from shared.bucket import open_bucket
        from shared.manifest import read_manifest

        m = read_manifest(open_bucket(bucket))
    except Exception as e:  # an unreadable bucket is shown, not raised
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    if m is None:
        return {"latest": None, "anchors": 0, "deltas": 0, "total_bytes": 0}
    return {"latest": m.latest, "anchors": len(m.anchors), "deltas": len(m.deltas),
            "anchor_versions": [a.version for a in m.anchors], "delta_versions": [d.version for d in m.deltas],
            "total_bytes": sum(e.bytes for e in (*m.anchors, *m.deltas))}


def build_status(state: RunState, *, bucket: str | None, refresh_replicas: bool = True) -> dict[str, Any]:
    snap = state.snapshot()
    steps = snap.pop("steps")
    pubs = snap.pop("publishes")
    batches = snap.pop("batches")
    pool = getattr(state, "pool", None)
    replicas = []
    if pool is not None:
        replicas = pool.refresh_status() if refresh_replicas else [r.view() for r in pool.replicas]
    full = snap.get("full_bf16_bytes")
    last = steps[-1] if steps else {}
    training = {
        "step": last.get("step", 0), "version": last.get("version", snap.get("start_version")),
        "reward_mean": last.get("reward_mean"), "loss": last.get("loss"), "kl": last.get("kl"),
        "is_ratio_mean": last.get("is_ratio_mean"), "steps_per_min": snap.pop("steps_per_min"),
        "history": steps,
    }
    sync = {
        "published": len(pubs), "latest_published": pubs[-1]["version"] if pubs else None,
        "full_bf16_bytes": full,
        "history": [{**p, "compression_vs_full": (full / p["bytes"]) if full and p.get("bytes") else None}
                    for p in pubs],
    }
    return {**snap, "training": training, "sync": sync, "batches": batches, "replicas": replicas,
            "bucket": _bucket_view(bucket)}


def _plots(status: dict[str, Any]):
    """matplotlib figures for the page (Agg backend: no display on a Space)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = status["training"]["history"]
    fig1, ax = plt.subplots(1, 3, figsize=(12, 3))
    xs = [h["step"] for h in hist]
    for a, key, title in zip(ax, ("reward_mean", "loss", "is_ratio_mean"), ("reward mean", "loss", "IS ratio mean")):
        a.plot(xs, [h.get(key, math.nan) for h in hist], marker="o")
        a.set_title(title)
        a.set_xlabel("step")
    fig1.tight_layout()
    pubs = status["sync"]["history"]
    fig2, bx = plt.subplots(1, 3, figsize=(12, 3))
    vs = [p["version"] for p in pubs]
    bx[0].semilogy(vs, [p.get("delta_bytes") or math.nan for p in pubs], "o-", label="delta")
    bx[0].semilogy(vs, [p.get("anchor_bytes") or math.nan for p in pubs], "s", label="anchor")
    if status["sync"]["full_bf16_bytes"]:
        bx[0].axhline(status["sync"]["full_bf16_bytes"], color="gray", ls="--", label="full bf16")
    bx[0].set_title("bytes per version")
    bx[0].legend()
    bx[1].plot(vs, [p.get("sparsity") for p in pubs], "o-")
    bx[1].set_title("sparsity (unchanged fraction)")
    bx[2].plot(vs, [p.get("encode_s") for p in pubs], "o-", label="encode s")
    bx[2].plot(vs, [p.get("upload_s") for p in pubs], "o-", label="upload s")
    bx[2].set_title("publish time")
    bx[2].legend()
    for a in bx:
        a.set_xlabel("version")
    fig2.tight_layout()
    plt.close("all")
    return fig1, fig2


def _replica_rows(status: dict[str, Any]) -> list[list[Any]]:
    mark = {True: "✓", False: "✗", None: "?"}
    return [[r["url"], r.get("served_version"), r.get("lag"), mark[r.get("digest_match")], r.get("last_pause_ms"),
             "up" if r.get("healthy") else f"down ({r.get('last_error')})"] for r in status["replicas"]]


def _summary(status: dict[str, Any]) -> str:
    t, s, b = status["training"], status["sync"], status["bucket"]

    def f(x, fmt="{:.4f}"):
        return "–" if x is None else fmt.format(x)

    last = s["history"][-1] if s["history"] else {}
    return (f"**phase** {status['phase']}" + (f" — **error** {status['error']}" if status.get("error") else "")
            + f"\n\n**training** step {t['step']} · version v{t['version']} · reward {f(t['reward_mean'])} · "
            f"loss {f(t['loss'])} · KL {f(t['kl'])} · IS ratio {f(t['is_ratio_mean'])} · "
            f"{f(t['steps_per_min'], '{:.1f}')} steps/min"
            + f"\n\n**sync** {s['published']} versions published · last v{last.get('version', '–')} "
            f"{'+'.join(last.get('kinds', []))} {last.get('bytes', 0):,} B · sparsity {f(last.get('sparsity'))} · "
            f"compression vs full bf16 {f(last.get('compression_vs_full'), '{:.1f}x')}"
            + f"\n\n**bucket** latest v{b.get('latest')} · {b.get('anchors')} anchors · {b.get('deltas')} deltas · "
            f"{b.get('total_bytes', 0):,} B")


def build_app(state: RunState, *, bucket: str | None, ui: bool = True) -> FastAPI:
    app = FastAPI(title="dws trainer")

    @app.get("/health")
    def health() -> dict:
        return {"status": "healthy", "phase": state.phase}

    @app.get("/status")
    def status() -> dict:
        return build_status(state, bucket=bucket)

    if ui:
        import gradio as gr

        with gr.Blocks(title="dws trainer") as demo:
            gr.Markdown("# dws trainer — GRPO over remote rollouts")
            summary = gr.Markdown()
            train_plot = gr.Plot(label="training")
            sync_plot = gr.Plot(label="sync")
            replicas = gr.Dataframe(headers=["replica", "served", "lag", "digest", "last pause ms", "health"],
                                    label="replicas")
            timer = gr.Timer(2.0)

            def refresh():
                st = build_status(state, bucket=bucket)
                p1, p2 = _plots(st)
                return _summary(st), p1, p2, _replica_rows(st)

            timer.tick(refresh, outputs=[summary, train_plot, sync_plot, replicas])
            demo.load(refresh, outputs=[summary, train_plot, sync_plot, replicas])
        app = gr.mount_gradio_app(app, demo, path="/")
    return app


class ServerHandle:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        self.server, self.thread = server, thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_background(state: RunState, *, host: str, port: int, bucket: str | None, ui: bool = True,
                        wait_s: float = 30.0) -> ServerHandle:
    app = build_app(state, bucket=bucket, ui=ui)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    # uvicorn installs signal handlers only on the main thread; here it runs beside training, so skip them.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    th = threading.Thread(target=server.run, name="dws-dashboard", daemon=True)
    th.start()
    deadline = time.time() + wait_s
    while not server.started and time.time() < deadline and th.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"dashboard server did not start on {host}:{port}")
    return ServerHandle(server, th)
