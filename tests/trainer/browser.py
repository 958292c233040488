"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by selenium, for the dashboard test.

`chromium_driver()` starts a fresh browser profile with the flags that keep it off the network and quiet. A missing
browser fails the test with the command that installs it, never a skip: `make test` runs tools/need-browser.sh first,
so a green run always includes this check. `dashboard_report`
reads what the rendered page actually shows.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1440,2400", "--hide-scrollbars"]


def chromium_driver():
    from selenium import webdriver  # part of the trainer venv (pyproject's trainer extra)
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Debian's chromium/chromium-driver are not installed: run tools/need-browser.sh "
                    "(or apt-get install -y chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="dws-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.dws_profile = profile
    return driver


def quit_driver(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.dws_profile, ignore_errors=True)


# Everything the test needs from the page in one round trip: plot images with their decoded sizes, table texts,
# the stat cards and any error Gradio shows (toasts, component error states).
REPORT_JS = """
const q = (sel) => Array.from(document.querySelectorAll(sel));
const imgs = (id) => q(`#${id} img`).map(i => ({w: i.naturalWidth, h: i.naturalHeight, done: i.complete}));
const table = (id) => q(`#${id} tbody tr`).map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.innerText.trim()));
const html = (id) => (document.querySelector(`#${id}`) || {}).innerText || '';
return {
  train: imgs('dws-train-plot'), sync: imgs('dws-sync-plot'),
  cards: html('dws-cards'),
  replicas: table('dws-replicas-table'), bucket: table('dws-bucket-table'), rollouts: table('dws-rollouts-table'),
  errors: q('.toast-body, .toast-wrap, .error, [data-testid="error"]').map(e => e.innerText.trim()).filter(Boolean),
  body: document.body.innerText,
};
"""


def dashboard_report(driver) -> dict:
    return driver.execute_script(REPORT_JS)
