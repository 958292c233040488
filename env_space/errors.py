"""The one exception env_space raises for bad client input, and how it maps to HTTP.

Owns `EnvInputError`. Anything a client can get wrong (unknown task or prompt id, a step without an episode, a reset
option of the wrong type) raises it with an HTTP status; the app's exception handler turns it into that status with a
pydantic-style body, and OpenEnv's WebSocket loop turns it into an error frame carrying the same message. It
deliberately is *not* a `ValueError`/`ValidationError`: OpenEnv's HTTP routes let any other exception become a 500,
and its WebSocket loop serialises pydantic errors in a way that can itself fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EnvInputError(Exception):
    """A request that cannot be served as sent; `status_code` is the HTTP answer (422 by default)."""

    def __init__(self, message: str, *, status_code: int = 422, loc: Sequence[str | int] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.loc = tuple(loc)

    def to_detail(self) -> dict[str, Any]:
        """Body in FastAPI's validation-error shape, plus a one-line `message`."""
        return {
            "detail": [{"loc": list(self.loc), "msg": self.message, "type": "value_error"}],
            "message": self.message,
        }


def describe_validation_errors(errors: Sequence[dict[str, Any]], *, limit: int = 5) -> str:
    """One readable line from pydantic errors, e.g. 'body.items.0.completion: Field required'."""
    parts = []
    for err in list(errors)[:limit]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = len(errors) - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts) or "invalid request"
