"""Configuration from environment variables, the way a Space receives it (its variables and secrets).

Owns the one parser each kind of value gets. The hazard is a typo read as a default: `DWS_UI=flase` must stop the
service with a message naming the variable, never turn the UI off (or on) silently. Every Space's flags default to
the variable of the same name, so the help text of a flag names its variable too (`help_env`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


class EnvVarError(ValueError):
    """A variable is set to something its option cannot take."""


def parse_bool(text: str, *, name: str = "value") -> bool:
    low = text.strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise EnvVarError(f"{name}={text!r} is not a boolean (use one of {sorted(TRUE | FALSE)})")


def env_str(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value; unset or empty reads as `default` (a Space variable cannot be "unset" once created)."""
    v = (os.environ if environ is None else environ).get(name)
    return v if v not in (None, "") else default


def env_bool(name: str, default: bool, *, environ: Mapping[str, str] | None = None) -> bool:
    v = env_str(name, environ=environ)
    return default if v is None else parse_bool(v, name=name)


def env_value(name: str, default: T, convert: Callable[[str], T], *,
              environ: Mapping[str, str] | None = None) -> T:
    """`convert(value)` of the variable, or `default`; a value that does not convert names the variable."""
    v = env_str(name, environ=environ)
    if v is None:
        return default
    try:
        return convert(v)
    except (TypeError, ValueError) as exc:
        raise EnvVarError(f"{name}={v!r}: {exc}") from None


def help_env(text: str, name: str) -> str:
    """A flag's help text ending with the variable that sets it: `... [DWS_BUCKET]`."""
    return f"{text} [{name}]"
