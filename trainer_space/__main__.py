"""`python -m trainer_space` / `dws train`: start the dashboard server, then run GRPO training to the end.

Owns the process entrypoint: logging setup, the startup log (never a token), the dashboard thread, and exit codes
(0 done, 2 stopped on non-finite weights -- nothing of that step is published -- or on staleness, 1 any other
failure). The dashboard keeps serving after the
run ends until the process is interrupted, unless `--exit-when-done`/`DWS_EXIT_WHEN_DONE` is set.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("dws.trainer")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DWS_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_when_done = "--exit-when-done" in argv or os.environ.get("DWS_EXIT_WHEN_DONE", "").lower() in {"1", "true"}
    argv = [a for a in argv if a != "--exit-when-done"]

    from shared.errors import NonFiniteWeightsError, OwnerConflictError
    from trainer_space.config import parse_args
    from trainer_space.dashboard import serve_in_background
    from trainer_space.grpo import StalenessError, train
    from trainer_space.state import RunState

    cfg = parse_args(argv)
    log.info("dws trainer: %s", {k: v for k, v in cfg.describe().items()})  # describe() masks every secret
    state = RunState(cfg.describe())
    server = serve_in_background(state, host=cfg.host, port=cfg.port, bucket=cfg.bucket, ui=cfg.ui)
    log.info("dashboard on http://%s:%d/ (GET /status, /health)", cfg.host, cfg.port)
    rc = 0
    try:
        train(cfg, state=state)
    except OwnerConflictError as e:
        # Another live run owns the bucket: a configuration problem to state in one line, not a traceback.
        log.error("REFUSED: %s", e)
        rc = 2
    except NonFiniteWeightsError as e:
        log.error("STOPPED: the weights hold NaN/Inf, nothing was published for this step: %s", e)
        rc = 2
    except StalenessError as e:
        log.error("STOPPED: %s", e)
        rc = 2
    except Exception as e:  # a clear one-line reason on top of the traceback
        log.exception("training failed: %s", e)
        rc = 1
    if not exit_when_done:
        log.info("run finished (rc=%d); dashboard keeps serving, Ctrl-C to exit", rc)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    server.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
