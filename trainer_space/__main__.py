"""`python -m trainer_space` / `dws train`: start the dashboard server, then run training to the end.

Owns the process entrypoint: logging setup, the startup log (never a token), the dashboard thread, and exit codes:
0 done; 2 refused or stopped for a reason to fix, stated in one line (another live run owns the bucket, the weights
hold NaN/Inf -- nothing of that step is published --, a bad option or variable); 1 any other failure (logged with its
traceback). When training ends the process exits if `--exit-when-done` (`DWS_EXIT_WHEN_DONE`) holds -- the default
outside a Space (`SPACE_ID` unset: a terminal, CI) -- and otherwise keeps serving the dashboard, as a Space should,
until interrupted.

Under torchrun (`torchrun --nproc_per_node N -m trainer_space ...`, trainer_space/sharded.py) every rank runs this
entrypoint: rank 0 serves the dashboard and logs as before; the other ranks log with their rank in each line, serve
nothing and exit when training ends. A configuration the rank count cannot run is refused by every rank in one line
(exit 2) before any process group is formed; torchrun then reports the failed workers.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("dws.trainer")


def main(argv: list[str] | None = None) -> int:
    world = os.environ.get("WORLD_SIZE", "1").strip()
    rank_tag = f" [rank {os.environ.get('RANK', '?')}/{world}]" if world not in ("", "1") else ""
    logging.basicConfig(level=os.environ.get("DWS_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s{rank_tag}: %(message)s")
    # httpx logs every request at INFO: hundreds of lines per step would bury the trainer's own one line per step.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import importlib.util

    # The trainer's dependency set (TRL, imported lazily when training starts): where it is missing, say so before
    # anything else -- `dws` turns this into its one-line "cannot run in this environment" message.
    if importlib.util.find_spec("trl") is None:
        raise ModuleNotFoundError("No module named 'trl'", name="trl")
    from trainer_space.config import parse_args

    cfg = parse_args(sys.argv[1:] if argv is None else list(argv))  # bad input: one line, exit 2 (argparse)

    from shared.envvars import EnvVarError
    from shared.errors import NonFiniteWeightsError, OwnerConflictError
    from trainer_space.page import serve_in_background
    from trainer_space.remote import NoHealthyEnvError, NoHealthyReplicaError, RolloutRequestError
    from trainer_space.sharded import Ranks
    from trainer_space.state import RunState
    from trainer_space.train import train

    ranks = Ranks.from_env()  # parse_args already refused a malformed one
    state = RunState(cfg.describe())
    server = None
    if ranks.main:
        log.info("dws trainer: %s", cfg.describe())  # describe() masks every secret
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
    except (EnvVarError, ValueError, NoHealthyEnvError, NoHealthyReplicaError, RolloutRequestError) as e:
        # bad configuration or peers that cannot be reached: one line saying which
        log.error("STOPPED: %s", e)
        rc = 2
    except Exception as e:  # a clear one-line reason on top of the traceback
        log.exception("training failed: %s", e)
        rc = 1
    if ranks.sharded:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    if not cfg.exit_when_done and server is not None:
        log.info("run finished (rc=%d); the dashboard keeps serving (--no-exit-when-done), Ctrl-C to exit", rc)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    if server is not None:
        server.stop()
    return rc


if __name__ == "__main__":
    sys.exit(main())
