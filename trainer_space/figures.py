"""The dashboard's figures: matplotlib (Agg backend, no display on a Space), drawn only from `status.build_status`'s
document.

Owns `plots(status)` -> (training figure, sync figure): reward (mean, per task), loss, ratio current / sampling policy
and KL, seconds per step by part (waiting for rollouts, train, publish), steps per minute, staleness and samples
dropped as stale (or episode turns for multi-turn tasks); bytes per version, sparsity, encode/upload seconds,
compression vs full bf16.
"""

from __future__ import annotations

import math
from typing import Any

from trainer_space.status import TIME_PARTS


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


def plots(status: dict[str, Any]):
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
    # the loss ratio current / sampling policy (replica logprobs) and KL
    _style(ax[2], "ratio current / sampling (mean) · KL", "step")
    if hist:
        ax[2].plot(xs, [h.get("ratio_mean", math.nan) for h in hist], "o-", ms=3, color="#7d5ba6", label="ratio")
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
    if status.get("multi_turn_tasks"):
        _style(ax[5], "episode turns (mean)", "step")
        tx = [h["step"] for h in hist if h.get("turns_mean") is not None]
        if tx:
            ax[5].plot(tx, [h["turns_mean"] for h in hist if h.get("turns_mean") is not None], "o-", ms=3)
        else:
            _no_data(ax[5])
    else:
        _style(ax[5], "staleness (versions) · dropped as stale", "step")
        if hist:
            ax[5].plot(xs, [h.get("staleness_mean", math.nan) for h in hist], "o-", ms=3, label="mean")
            ax[5].plot(xs, [h.get("staleness_max", math.nan) for h in hist], "s--", ms=3, label="max")
            ax[5].bar(xs, [h.get("dropped_stale") or 0 for h in hist], alpha=0.4, color="#e4572e", label="dropped")
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
