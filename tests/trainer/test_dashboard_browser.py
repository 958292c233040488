"""The trainer dashboard in a real headless Chromium (Debian's chromium + chromium-driver, through selenium) against
the suite's trainer (`run1`, whose server keeps serving after training as the Space does).

Waits until Gradio has rendered both figures (decoded images) and the tables with data, saves a screenshot to
`artifacts/dashboard.png` (git-ignored), and fails on an error shown by the page or on missing data. The figures on
the page are compared with `GET /status`, which must carry the same numbers."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from browser import chromium_driver, dashboard_report, quit_driver
from trainer_helpers import RUN1_STEPS, bucket_latest, sync_replica
from dws_testing import REPO

pytestmark = pytest.mark.slow
ARTIFACT = REPO / "artifacts" / "dashboard.png"


def _ready(r: dict) -> bool:
    imgs = r["train"] + r["sync"]
    return (len(r["train"]) == 1 and len(r["sync"]) == 1 and all(i["done"] and i["w"] > 0 for i in imgs)
            and bool(r["replicas"]) and bool(r["bucket"]) and "step / version" in r["cards"].lower())


def test_dashboard_renders_with_data(run1, services):
    # Replica figures are live: let the replica settle on the bucket's latest version so page and JSON agree.
    sync_replica(services["gw"], bucket_latest(services["bucket"]))
    status = httpx.get(f"{run1['dash']}/status", timeout=60).json()
    driver = chromium_driver()
    try:
        driver.get(run1["dash"] + "/")
        deadline = time.time() + 90
        report = dashboard_report(driver)
        while not _ready(report) and time.time() < deadline:
            time.sleep(1)
            report = dashboard_report(driver)
        # Full-page screenshot: a window taller than the page (its outer size includes the browser frame), then cut
        # just below the last section.
        bottom = driver.execute_script(
            "const els = ['#dws-rollouts-table', '#dws-bucket-table'].map(s => document.querySelector(s)).filter(e => e);"
            "return els.length ? Math.max(...els.map(e => e.getBoundingClientRect().bottom)) + scrollY"
            " : document.body.scrollHeight")
        driver.set_window_size(1440, int(bottom) + 400)
        time.sleep(1)
        ARTIFACT.parent.mkdir(exist_ok=True)
        png = driver.get_screenshot_as_png()
        ratio = driver.execute_script("return window.devicePixelRatio")
        with Image.open(io.BytesIO(png)) as im:
            im.crop((0, 0, im.width, min(im.height, int((bottom + 30) * ratio)))).save(ARTIFACT)
        report = dashboard_report(driver)
    finally:
        quit_driver(driver)
    assert _ready(report), {k: v for k, v in report.items() if k != "body"}
    assert not report["errors"], report["errors"]
    assert "error" not in report["cards"].lower(), report["cards"]
    # Figures are real plots, not placeholders: matplotlib PNGs the size the dashboard draws them.
    assert report["train"][0]["w"] >= 1000 and report["train"][0]["h"] >= 500
    assert report["sync"][0]["w"] >= 1000 and report["sync"][0]["h"] >= 250
    cards = report["cards"]
    t = status["training"]
    assert f"{t['step']} / v{t['version']}" in cards and t["step"] == RUN1_STEPS
    assert f"{t['reward_mean']:.3f}" in cards and "short" in cards  # mean and per task
    assert f"{t['loss']:.4f}" in cards and f"ratio current/sampling {t['ratio_mean']:.3f}" in cards
    assert f"{t['steps_per_min']:.1f}" in cards
    # Replicas: URL, served version, lag, digest, last pause, requests, tokens/s, health; then the env Spaces.
    rep = status["replicas"][0]
    row = report["replicas"][0]
    assert row[0] == rep["url"] and row[1] == f"v{rep['served_version']}" and row[3] == str(rep["lag"])
    assert row[4] == "✓" and row[8] == "up" and row[5] != "–" and float(row[7]) > 0
    assert report["replicas"][-1][0].endswith("(env)") and report["replicas"][-1][8] == "up"
    # Bucket: anchors and deltas kept, total size, latest version.
    bucket = dict((r[0], r[1]) for r in report["bucket"])
    b = status["bucket"]
    assert bucket["latest version"] == f"v{b['latest']}"
    assert bucket["anchors kept"].startswith(f"{b['anchors']} (") and bucket["deltas kept"].startswith(f"{b['deltas']} (")
    assert bucket["total size"].endswith("MB") or bucket["total size"].endswith("kB")
    rollouts = dict((r[0], r[1]) for r in report["rollouts"])
    ro = status["rollouts"]
    assert rollouts["samples dropped as stale (by TRL)"] == str(ro["samples_dropped_stale"])
    assert rollouts["groups · samples produced"].startswith(f"{ro['groups']} · ")
    print(f"screenshot: {ARTIFACT}")
