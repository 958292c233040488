"""`python -m env_space` / `dws env`: parse flags (with env-var fallbacks), log one startup line, run uvicorn.

Owns `main(argv=None)`. Uvicorn's WebSocket limits are set here because they are transport settings: frames are
capped at the same size as HTTP bodies, and per-message deflate is off (its per-connection zlib state costs memory
at hundreds of sessions and CPU on tiny frames).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from env_space.config import parse_config

    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper() if config.log_level != "trace" else "DEBUG",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from env_space.app import build_app

    app = build_app(config)
    logging.getLogger("env_space").info(config.describe())  # never includes the API key
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        ws_max_size=config.max_body_bytes,
        ws_per_message_deflate=False,
        proxy_headers=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
