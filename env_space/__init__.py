"""env_space: the dws environment Space -- OpenEnv episodes and batch scoring over HTTP(S).

Owns the environment service of DESIGN.md §4. Modules: `tasks` (registry and rules: wordle, letter, short, reverse),
`models` (typed OpenEnv action/observation/state), `environment` (the OpenEnv `Environment`), `v1` (batch scoring and
prompt listing), `guard` (auth, size limit, session-cap refusal), `metrics`, `ui` (Gradio page), `app` (assembly),
`config` and `__main__` (`python -m env_space`), `client` (OpenEnv `EnvClient` subclass plus an HTTP scoring client).
Importing the package stays light: nothing here needs torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for `dws env` (same as `python -m env_space`)."""
    from env_space.__main__ import main as _main

    return _main(argv)
