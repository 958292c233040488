"""The trainer's HTTP server and page: `GET /health`, `GET /status` (JSON) and a Gradio dashboard at `/`.

Owns the page's cards and tables (HTML), `build_app` and `serve_in_background` (uvicorn in a daemon thread so the
training loop keeps the main thread). The page refreshes on a `gr.Timer` and is drawn only from what
`status.build_status` returns (figures: `figures.plots`), so the page and `/status` cannot disagree.
"""

from __future__ import annotations

import html
import logging
import math
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from trainer_space.state import RunState
from trainer_space.status import build_status

log = logging.getLogger("dws.trainer.dashboard")


def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _mb(n) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB")


def _cards(status: dict[str, Any]) -> str:
    t, s, b, ro = status["training"], status["sync"], status["bucket"], status["rollouts"]
    ups = sum(1 for r in status["replicas"] if r.get("healthy"))
    phase = status["phase"]
    colour = {"done": "#2a9d8f", "training": "#4c86a8", "failed": "#e4572e"}.get(phase, "#888")
    by_task = " · ".join(f"{k} {_f(v)}" for k, v in (t.get("reward_by_task") or {}).items())
    cards = [
        ("phase", f"<span style='color:{colour}'>{html.escape(phase)}</span>", f"{status['elapsed_s']:.0f} s"),
        ("step / version", f"{t['step']} / v{_f(t['version'], '{}')}", f"started at v{status.get('start_version')}"),
        ("reward mean", _f(t["reward_mean"]), html.escape(by_task) or "&nbsp;"),
        ("loss · KL", f"{_f(t['loss'], '{:.4f}')} · {_f(t['kl'], '{:.4f}')}",
         f"ratio current/sampling {_f(t['ratio_mean'])}"),
        ("steps / min", _f(t["steps_per_min"], "{:.1f}"),
         f"{_f(status['timings_mean_s'].get('step_s'))} s per step"),
        ("staleness mean / max", f"{_f(ro.get('staleness_mean'), '{:.2f}')} / {_f(ro.get('staleness_max'), '{:.0f}')}",
         f"{ro.get('samples_dropped_stale', 0)} dropped as stale · queue {_f(ro.get('queue_size'), '{}')}"),
        ("published", f"v{_f(s['latest_published'], '{}')}",
         f"median delta {_mb(s.get('delta_bytes_median'))} · {_f(s.get('compression_vs_full_median'), '{:.0f}')}×"),
        ("replicas up", f"{ups} / {len(status['replicas'])}", f"bucket latest v{_f(b.get('latest'), '{}')}"),
    ]
    body = "".join(f"<div class='dws-card'><div class='dws-k'>{k}</div><div class='dws-v'>{v}</div>"
                   f"<div class='dws-s'>{sub}</div></div>" for k, v, sub in cards)
    err = (f"<div class='dws-error'>error: {html.escape(str(status['error']))}</div>"
           if status.get("error") else "")
    return f"{err}<div class='dws-cards'>{body}</div>"


def _table(head: list[str], rows: list[list[Any]], *, elem_id: str, raw_cols: tuple[int, ...] = ()) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_cols else html.escape(str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    if not rows:
        body = f"<tr><td colspan='{len(head)}' class='dws-empty'>no data yet</td></tr>"
    return f"<table class='dws-table' id='{elem_id}'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _replicas_html(status: dict[str, Any]) -> str:
    mark = {True: "<span class='dws-ok'>✓</span>", False: "<span class='dws-bad'>✗</span>", None: "?"}
    rows = [[html.escape(r["url"]), _f(r.get("served_version"), "v{}"), _f(r.get("latest_version"), "v{}"),
             _f(r.get("lag"), "{}"), mark[r.get("digest_match")], _f(r.get("last_pause_ms"), "{:.0f}"),
             r.get("requests", 0), _f(r.get("tokens_per_s"), "{:.1f}"),
             "<span class='dws-ok'>up</span>" if r.get("healthy")
             else f"<span class='dws-bad'>down</span> {html.escape(str(r.get('last_error')))}"]
            for r in status["replicas"]]
    rows += [[html.escape(e["url"]) + " (env)", "", "", "", "", "", e.get("requests", 0), "",
              "<span class='dws-ok'>up</span>" if e.get("healthy")
              else f"<span class='dws-bad'>down</span> {html.escape(str(e.get('last_error')))}"]
             for e in status.get("envs") or []]
    return _table(["replica", "served", "bucket latest", "lag", "digest", "last pause ms", "requests",
                   "tokens/s", "health"], rows, elem_id="dws-replicas-table", raw_cols=tuple(range(9)))


def _bucket_html(status: dict[str, Any]) -> str:
    b = status["bucket"]
    if b.get("error"):
        return _table(["", "value"], [["error", b["error"]]], elem_id="dws-bucket-table")
    av, dv = b.get("anchor_versions") or [], b.get("delta_versions") or []
    rows = [["latest version", _f(b.get("latest"), "v{}")],
            ["anchors kept", f"{b.get('anchors', 0)} ({', '.join(f'v{v}' for v in av) or '–'}) · "
                             f"{_mb(b.get('anchor_bytes'))}"],
            ["deltas kept", f"{b.get('deltas', 0)} ({f'v{dv[0]}…v{dv[-1]}' if dv else '–'}) · "
                            f"{_mb(b.get('delta_bytes'))}"],
            ["total size", _mb(b.get("total_bytes"))],
            ["full bf16 checkpoint", _mb(status["sync"].get("full_bf16_bytes"))]]
    return _table(["bucket", ""], rows, elem_id="dws-bucket-table")


def _rollouts_html(status: dict[str, Any]) -> str:
    ro, tm = status["rollouts"], status["timings_mean_s"]
    e = ro.get("episodes") or {}
    share = ro.get("rollout_wait_share")
    rows = [["generation requests in flight (max) · samples queued", f"{_f(ro.get('max_inflight'), '{}')} · "
             f"{_f(ro.get('queue_size'), '{}')}"],
            ["groups · samples produced", f"{ro.get('groups', 0)} · {ro.get('samples_produced', 0)}"],
            ["samples dropped as stale (by TRL)", ro.get("samples_dropped_stale", 0)],
            ["staleness mean · max (versions)",
             f"{_f(ro.get('staleness_mean'), '{:.2f}')} · {_f(ro.get('staleness_max'), '{:.0f}')}"],
            ["trainer waiting for rollouts (s total · share of step time)",
             f"{_f(ro.get('rollout_wait_s_total'), '{:.2f}')} · {'–' if share is None else f'{100 * share:.0f}%'}"],
            ["producers holding back for a fresh replica · blocked on a full queue (s)",
             f"{_f(ro.get('waiting_for_fresh_replica_s'), '{:.1f}')} · {_f(ro.get('backpressure_s'), '{:.1f}')}"],
            ["mean s/step: waiting for rollouts · train · publish",
             " · ".join(_f(tm.get(k)) for k in ("rollout_wait_s", "train_s", "publish_block_s"))]]
    if e.get("episodes"):
        rows += [["episodes played · mean turns · max turns", f"{e['episodes']} · {e['turns_mean']} · {e['turns_max']}"],
                 ["episodes longer than one turn · mean return", f"{e['multi_turn_episodes']} · {e['return_mean']}"]]
    return _table(["rollouts", ""], rows, elem_id="dws-rollouts-table")


CSS = """
.dws-cards {display:grid; grid-template-columns:repeat(4, minmax(0, 1fr)); gap:10px;}
.dws-card {border:1px solid var(--border-color-primary); border-radius:8px; padding:10px 14px;
           background:var(--block-background-fill);}
.dws-k {font-size:13px; color:var(--body-text-color-subdued); font-weight:600;}
.dws-v {font-size:24px; font-weight:600; margin:2px 0;}
.dws-s {font-size:12px; color:var(--body-text-color-subdued); white-space:nowrap; overflow:hidden;
        text-overflow:ellipsis;}
.dws-table {width:100%; border-collapse:collapse !important; font-size:13px; border:none !important;}
.dws-table tr {border:none !important; background:none !important;}
.dws-table th, .dws-table td {border:none !important; border-bottom:1px solid var(--border-color-primary) !important;
                              padding:6px 10px !important; text-align:left;}
.dws-table th {font-weight:600; color:var(--body-text-color-subdued); font-size:12px;
               border-bottom:2px solid var(--border-color-primary) !important;}
.dws-table tr:last-child td {border-bottom:none !important;}
.dws-empty {color:var(--body-text-color-subdued); text-align:center;}
.dws-ok {color:#2a9d8f; font-weight:700;}
.dws-bad {color:#e4572e; font-weight:700;}
.dws-error {background:#fde8e4; color:#9b2c14; border:1px solid #e4572e; border-radius:8px; padding:10px 14px;
            margin-bottom:10px; font-weight:600;}
"""


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

        from trainer_space.figures import plots

        with gr.Blocks(title="dws trainer") as demo:
            gr.Markdown("## dws trainer — GRPO over remote rollouts, weights through the bucket  \n"
                        "The same figures as JSON at [`/status`](status); refreshes every 2 s.")
            cards = gr.HTML(elem_id="dws-cards")
            gr.Markdown("### Training")
            train_plot = gr.Plot(show_label=False, elem_id="dws-train-plot")
            gr.Markdown("### Sync — what each version costs in the bucket")
            sync_plot = gr.Plot(show_label=False, elem_id="dws-sync-plot")
            gr.Markdown("### Replicas")
            replicas = gr.HTML(elem_id="dws-replicas")
            with gr.Row():
                bucket_tbl = gr.HTML(elem_id="dws-bucket")
                rollout_tbl = gr.HTML(elem_id="dws-rollouts")
            timer = gr.Timer(2.0)
            drawn = gr.State(None)  # per browser session: what its figures show
            outputs = [cards, train_plot, sync_plot, replicas, bucket_tbl, rollout_tbl, drawn]

            def refresh(shown):
                st = build_status(state, bucket=bucket)
                # Redraw the figures only when there is something new: matplotlib costs CPU the trainer needs.
                hist = st["training"]["history"]
                key = [len(hist), len(st["sync"]["history"]), hist[-1].get("loss") if hist else None]
                figs = (gr.skip(), gr.skip()) if shown == key else plots(st)
                return _cards(st), *figs, _replicas_html(st), _bucket_html(st), _rollouts_html(st), key

            timer.tick(refresh, inputs=[drawn], outputs=outputs)
            demo.load(refresh, inputs=[drawn], outputs=outputs)
        app = gr.mount_gradio_app(app, demo, path="/", css=CSS, footer_links=[])
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
