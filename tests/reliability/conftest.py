"""Fixtures of the reliability suite (runs in .venv/rollout; services start from their own Space's venv).

Every test records what it measured -- faults tried, where they landed, wrong weights served, data lost, 5xx --
through the `figures` fixture; at the end of the session they are merged into `artifacts/reliability.json`, which the
README's "Reliability" table is copied from. Figures are written before a test asserts on them, so a failing run
shows the numbers that made it fail.
"""

from __future__ import annotations

import json
import time

import pytest

from dws_testing import REPO

REPORT_PATH = REPO / "artifacts" / "reliability.json"


@pytest.fixture(scope="session")
def figures():
    data: dict = {}
    yield data
    if not data:
        return
    REPORT_PATH.parent.mkdir(exist_ok=True)
    try:
        merged = json.loads(REPORT_PATH.read_text())
    except (OSError, ValueError):
        merged = {}
    merged.update(data)  # a partial run (one module) keeps the other modules' figures
    merged["_updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    REPORT_PATH.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
