"""The Gradio page at `/`: the same live numbers as `GET /status`, refreshed every two seconds.

Owns `mount_ui`. A small `gr.Blocks` mounted with `gr.mount_gradio_app` after every API route, so `/health`, `/ws`,
`/v1/...` keep precedence and only otherwise-unmatched paths reach Gradio. It reads the status function in-process
(no HTTP round trip, so it works unchanged when an API key is required).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI


def _summary(status: dict[str, Any]) -> str:
    s, m = status["sessions"], status["metrics"]
    return (f"**Sessions** {s['active']} / {s['max']} (idle timeout {s['timeout_s'] or 'off'} s) · "
            f"**requests/s** {m['requests_per_s']:.1f} · **steps/s** {m['steps_per_s']:.1f} · "
            f"**scored/s** {m['scored_per_s']:.1f} · uptime {m['uptime_s']:.0f} s")


def _rows(status: dict[str, Any]) -> list[list[Any]]:
    def fmt(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    return [[name, t["rewards"], fmt(t["mean_reward"]), t["scored"], t["episodes"], fmt(t["mean_return"])]
            for name, t in status["metrics"]["tasks"].items()]


def mount_ui(app: FastAPI, *, status: Callable[[], dict[str, Any]]) -> FastAPI:
    # Hazard: Gradio phones home for analytics at import; a Space or CI box without internet would stall on it.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    with gr.Blocks(title="dws env_space") as page:
        gr.Markdown("# dws env_space\nOpenEnv environment server: Wordle and small tasks a tiny model can learn. "
                    "JSON at `/status`, API docs at `/docs`.")
        summary = gr.Markdown()
        table = gr.Dataframe(headers=["task", "rewards", "mean reward", "scored", "episodes", "mean return"],
                             interactive=False)
        raw = gr.JSON(label="/status")

        def refresh() -> tuple[str, list[list[Any]], dict[str, Any]]:
            st = status()
            return _summary(st), _rows(st), st

        page.load(refresh, outputs=[summary, table, raw])
        gr.Timer(2.0).tick(refresh, outputs=[summary, table, raw])

    return gr.mount_gradio_app(app, page, path="/", footer_links=[], run_history=False)
