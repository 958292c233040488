"""The trainer's HTTP server: `GET /health`, `GET /status` (JSON) and a Gradio dashboard at `/`.

Owns `build_status` (one JSON document: training, timings and overlap, episodes, sync, replicas, bucket),
`build_app` and `serve_in_background` (uvicorn in a daemon thread so the training loop keeps the main thread). The
page refreshes on a `gr.Timer` and is drawn only from what `build_status` returns, so the page and `/status` cannot
disagree. Replica figures come from each replica's own `/status`; bucket figures from the manifest. Nothing here can
block training: every remote read has a short timeout and failures become fields.
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

log = logging.getLogger("dws.trainer.dashboard")

# Step-time parts, in stacking order: (status key, label, colour).
TIME_PARTS = (("generate_s", "generate (waited for)", "#e4572e"), ("wait_s", "stale wait", "#f3a712"),
              ("score_s", "score", "#a8c686"), ("train_s", "train", "#4c86a8"),
              ("publish_block_s", "publish (blocking)", "#7d5ba6"))


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
            "anchor_bytes": sum(a.bytes for a in m.anchors), "delta_bytes": sum(d.bytes for d in m.deltas),
            "total_bytes": sum(e.bytes for e in (*m.anchors, *m.deltas))}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


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
        "reward_mean": last.get("reward_mean"), "reward_by_task": last.get("reward_by_task"),
        "loss": last.get("loss"), "kl": last.get("kl"), "is_ratio_mean": last.get("is_ratio_mean"),
        "steps_per_min": snap.pop("steps_per_min"), "history": steps,
    }
    timings = {k: _mean([s.get(k) for s in steps]) for k, _, _ in TIME_PARTS}
    timings.update(step_s=_mean([s.get("step_s") for s in steps]),
                   hidden_generate_s=_mean([s.get("hidden_generate_s", 0.0) for s in steps]))
    # What a following replica downloads for a version is its delta (an anchor is for newcomers), so compression is
    # full bf16 over the delta where there is one, over the anchor otherwise.
    hist = [{**p, "compression_vs_full": (full / (p.get("delta_bytes") or p["bytes"])) if full and p.get("bytes")
             else None} for p in pubs]
    sync = {
        "published": len(pubs), "latest_published": pubs[-1]["version"] if pubs else None,
        "full_bf16_bytes": full, "history": hist,
        "delta_bytes_median": _median([p.get("delta_bytes") for p in pubs]),
        "compression_vs_full_median": _median([h["compression_vs_full"] for h in hist if h.get("delta_bytes")]),
    }
    return {**snap, "training": training, "timings_mean_s": timings, "sync": sync, "batches": batches,
            "replicas": replicas, "bucket": _bucket_view(bucket)}


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


# ------------------------------------------------------------------------------------------------------ figures
def _style(ax, title: str, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and versions are whole numbers
    ax.set_title(title, fontsize=10, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="#888")


def _plots(status: dict[str, Any]):
    """matplotlib figures for the page (Agg backend: no display on a Space)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = status["training"]["history"]
    xs = [h["step"] for h in hist]
    fig1, ax = plt.subplots(2, 3, figsize=(13, 6.2))
    ax = ax.ravel()
    # reward: mean and per task
    _style(ax[0], "reward (mean, per task)", "step")
    if hist:
        ax[0].plot(xs, [h.get("reward_mean", math.nan) for h in hist], "o-", lw=2, ms=3, label="mean", color="#222")
        tasks = sorted({t for h in hist for t in (h.get("reward_by_task") or {})})
        if len(tasks) > 1 or (tasks and status.get("multi_turn_tasks")):
            for t in tasks:
                ax[0].plot(xs, [(h.get("reward_by_task") or {}).get(t, math.nan) for h in hist], ".--", label=t)
        ax[0].legend(fontsize=7)
    else:
        _no_data(ax[0])
    _style(ax[1], "loss", "step")
    ax[1].plot(xs, [h.get("loss", math.nan) for h in hist], "o-", ms=3, color="#4c86a8") if hist else _no_data(ax[1])
    # KL and the importance-sampling ratio of the remote logprobs
    _style(ax[2], "IS ratio (mean, min–max) · KL", "step")
    if hist:
        ax[2].fill_between(xs, [h.get("is_ratio_min", math.nan) for h in hist],
                           [h.get("is_ratio_max", math.nan) for h in hist], alpha=0.2, color="#7d5ba6")
        ax[2].plot(xs, [h.get("is_ratio_mean", math.nan) for h in hist], "o-", ms=3, color="#7d5ba6",
                   label="IS ratio")
        ax[2].plot(xs, [h.get("kl", math.nan) for h in hist], "s-", ms=3, color="#e4572e", label="KL")
        ax[2].legend(fontsize=7)
    else:
        _no_data(ax[2])
    # seconds per step, stacked; generation hidden behind training drawn beside it
    _style(ax[3], "seconds per step", "step")
    if hist:
        bottom = [0.0] * len(hist)
        for key, label, colour in TIME_PARTS:
            vals = [h.get(key) or 0.0 for h in hist]
            ax[3].bar(xs, vals, bottom=bottom, color=colour, label=label, width=0.8)
            bottom = [b + v for b, v in zip(bottom, vals)]
        hidden = [h.get("hidden_generate_s") or 0.0 for h in hist]
        if any(hidden):
            ax[3].plot(xs, hidden, "k^:", ms=4, label="generate hidden (overlap)")
        # One slow step (the first one waits for the replica to load v0) must not flatten all the others: clip the
        # axis and print the clipped totals on their bars.
        typical = sorted(bottom)[len(bottom) // 2]
        if len(bottom) > 3 and max(bottom) > 4 * typical > 0:
            top = 3 * typical
            ax[3].set_ylim(0, top)
            for x, total in zip(xs, bottom):
                if total > top:
                    ax[3].text(x, top * 0.97, f"{total:.1f}s", ha="center", va="top", fontsize=7, rotation=90,
                               color="white", fontweight="bold")
        ax[3].legend(fontsize=6, ncol=2, loc="upper right", framealpha=0.9)
    else:
        _no_data(ax[3])
    _style(ax[4], "steps per minute", "step")
    ts = [h.get("t") for h in hist]
    if len(hist) > 1:
        spm = [math.nan] + [60 * min(i, 5) / (ts[i] - ts[i - min(i, 5)]) if ts[i] > ts[i - min(i, 5)] else math.nan
                            for i in range(1, len(ts))]
        ax[4].plot(xs, spm, "o-", ms=3, color="#2a9d8f")
        ax[4].set_ylim(bottom=0)
    else:
        _no_data(ax[4])
    batches = status.get("batches") or []
    if status.get("multi_turn_tasks"):
        _style(ax[5], "episode turns (mean, max)", "step")
        bx = [b["step"] for b in batches if b.get("turns")]
        ax[5].plot(bx, [sum(b["turns"]) / len(b["turns"]) for b in batches if b.get("turns")], "o-", ms=3,
                   label="mean")
        ax[5].plot(bx, [max(b["turns"]) for b in batches if b.get("turns")], "s--", ms=3, label="max")
        ax[5].legend(fontsize=7)
        if not bx:
            _no_data(ax[5])
    else:
        _style(ax[5], "batch lag (versions) · regenerations", "step")
        if batches:
            ax[5].plot([b["step"] for b in batches], [b["lag"] for b in batches], "o-", ms=3, label="lag")
            ax[5].bar([b["step"] for b in batches], [len(b["rejected_lags"]) for b in batches], alpha=0.4,
                      color="#e4572e", label="regenerated")
            ax[5].legend(fontsize=7)
        else:
            _no_data(ax[5])
    fig1.tight_layout()

    pubs = status["sync"]["history"]
    fig2, bx = plt.subplots(1, 4, figsize=(13, 3.2))
    vs = [p["version"] for p in pubs]
    _style(bx[0], "bytes per version (log)", "version")
    if pubs:
        bx[0].semilogy(vs, [p.get("delta_bytes") or math.nan for p in pubs], "o-", ms=3, label="delta")
        bx[0].semilogy(vs, [p.get("anchor_bytes") or math.nan for p in pubs], "s", ms=6, label="anchor")
        if status["sync"]["full_bf16_bytes"]:
            bx[0].axhline(status["sync"]["full_bf16_bytes"], color="gray", ls="--", label="full bf16")
        bx[0].legend(fontsize=7)
    else:
        _no_data(bx[0])
    _style(bx[1], "sparsity (unchanged fraction)", "version")
    dv = [p for p in pubs if p.get("delta_bytes")]
    if dv:
        bx[1].plot([p["version"] for p in dv], [p.get("sparsity") for p in dv], "o-", ms=3, color="#2a9d8f")
    else:
        _no_data(bx[1])
    _style(bx[2], "encode / upload seconds", "version")
    if pubs:
        bx[2].plot(vs, [p.get("encode_s") for p in pubs], "o-", ms=3, label="encode")
        bx[2].plot(vs, [p.get("upload_s") for p in pubs], "s-", ms=3, label="upload")
        bx[2].legend(fontsize=7)
    else:
        _no_data(bx[2])
    _style(bx[3], "compression: full bf16 / delta (×)", "version")
    if dv:
        ratios = [p.get("compression_vs_full") or math.nan for p in dv]
        bx[3].bar([p["version"] for p in dv], ratios, color="#4c86a8")
        finite = [r for r in ratios if not math.isnan(r)]
        if finite and max(finite) > 20 * min(finite):  # e.g. an all-unchanged delta next to ordinary ones
            bx[3].set_yscale("log")
    else:
        _no_data(bx[3])
    fig2.tight_layout()
    plt.close("all")
    return fig1, fig2


# ------------------------------------------------------------------------------------------------ text and tables
def _f(x, fmt="{:.3f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _mb(n) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB")


def _cards(status: dict[str, Any]) -> str:
    t, s, b, o = status["training"], status["sync"], status["bucket"], status.get("overlap") or {}
    ups = sum(1 for r in status["replicas"] if r.get("healthy"))
    phase = status["phase"]
    colour = {"done": "#2a9d8f", "training": "#4c86a8", "failed": "#e4572e"}.get(phase, "#888")
    by_task = " · ".join(f"{k} {_f(v)}" for k, v in (t.get("reward_by_task") or {}).items())
    cards = [
        ("phase", f"<span style='color:{colour}'>{html.escape(phase)}</span>", f"{status['elapsed_s']:.0f} s"),
        ("step / version", f"{t['step']} / v{_f(t['version'], '{}')}", f"started at v{status.get('start_version')}"),
        ("reward mean", _f(t["reward_mean"]), html.escape(by_task) or "&nbsp;"),
        ("loss · KL", f"{_f(t['loss'], '{:.4f}')} · {_f(t['kl'], '{:.4f}')}", f"IS ratio {_f(t['is_ratio_mean'])}"),
        ("steps / min", _f(t["steps_per_min"], "{:.1f}"),
         f"{_f(status['timings_mean_s'].get('step_s'))} s per step"),
        ("overlap", "on" if o.get("enabled") else "off",
         f"{o.get('prefetched', 0)} prefetched · {_f(o.get('generate_hidden_s'), '{:.1f}')} s hidden"),
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
             r.get("requests", 0),
             "<span class='dws-ok'>up</span>" if r.get("healthy")
             else f"<span class='dws-bad'>down</span> {html.escape(str(r.get('last_error')))}"]
            for r in status["replicas"]]
    return _table(["replica", "served", "bucket latest", "lag", "digest", "last pause ms", "requests", "health"],
                  rows, elem_id="dws-replicas-table", raw_cols=tuple(range(8)))


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
    o, e, tm = status.get("overlap") or {}, status.get("episodes") or {}, status["timings_mean_s"]
    batches = status.get("batches") or []
    last = batches[-1] if batches else {}
    versions = sorted({v for v in last.get("versions", []) if v is not None})
    rows = [["overlap: next batch generated during training", "on" if o.get("enabled") else "off"],
            ["batches prefetched / generated on demand", f"{o.get('prefetched', 0)} / {o.get('sync', 0)}"],
            ["generation hidden / waited for (s, total)",
             f"{_f(o.get('generate_hidden_s'), '{:.2f}')} / {_f(o.get('generate_exposed_s'), '{:.2f}')}"],
            ["prefetched batches rejected as stale", o.get("prefetch_rejected_stale", 0)],
            ["mean s/step: generate · score · train · publish",
             " · ".join(_f(tm.get(k)) for k in ("generate_s", "score_s", "train_s", "publish_block_s"))],
            ["last batch: trainer version · batch versions · lag",
             f"v{last.get('trainer_version', '–')} · {', '.join(f'v{v}' for v in versions) or '–'} · "
             f"{last.get('lag', '–')}"]]
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
                key = [len(hist), len(st["sync"]["history"]), len(st["batches"]), hist[-1].get("loss") if hist else None]
                figs = (gr.skip(), gr.skip()) if shown == key else _plots(st)
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
