"""Fixtures shared by every suite. Each suite runs in its own Space's venv (docs/design.md §2), so this file imports
only the standard library and pytest at module level."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dws_tools.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
