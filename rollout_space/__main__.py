"""`python -m rollout_space` / `dws rollout`: a rollout replica (vLLM child on 127.0.0.1 + public gateway).

Owns the replica's command line. Every flag defaults to an environment variable (a Space's variables and secrets)
and its `--help` names it; a variable that does not parse (`DWS_POLL_INTERVAL=fast`, `DWS_UI=flase`) is a one-line
error naming the variable, exit 2. Token values are never logged.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
from pathlib import Path

from shared.envvars import EnvVarError, env_bool, env_str, env_value, help_env
from shared.proc import free_port


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError("must be >= 1")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dws rollout", description="Run a dws rollout replica: vLLM (loopback only) "
                                 "that follows a bucket, behind an OpenAI-compatible gateway.")
    try:
        _add_flags(ap)
    except EnvVarError as exc:
        ap.error(str(exc))
    args = ap.parse_args(argv)
    if args.verify not in ("every", "anchors"):  # argparse checks choices on the command line, not on defaults
        ap.error(f"DWS_VERIFY={args.verify!r} is not one of 'every', 'anchors'")
    missing = [f for f in ("model", "bucket") if not getattr(args, f)]
    if missing:
        ap.error("missing " + ", ".join(f"--{m} (or DWS_{m.upper()})" for m in missing))
    from rollout_space.vllm_proc import check_extra_args

    try:
        args.vllm_extra = shlex.split(args.vllm_args)
        check_extra_args(args.vllm_extra)
    except ValueError as exc:  # ReservedFlagError, or unbalanced quotes
        ap.error(f"--vllm-args / DWS_VLLM_ARGS: {exc}")
    return args


def _add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=env_str("DWS_MODEL"), help=help_env("base model: Hub id or local folder",
                                                                           "DWS_MODEL"))
    ap.add_argument("--bucket", default=env_str("DWS_BUCKET"),
                    help=help_env("hf://buckets/<ns>/<name>[/prefix] or a local folder", "DWS_BUCKET"))
    ap.add_argument("--host", default=env_str("HOST", "0.0.0.0"), help=help_env("gateway address", "HOST"))
    ap.add_argument("--port", type=int, default=env_value("PORT", 7860, int), help=help_env("gateway port", "PORT"))
    ap.add_argument("--vllm-port", type=int, default=env_value("DWS_VLLM_PORT", 0, int),
                    help=help_env("loopback port for the vLLM child (default: a free one)", "DWS_VLLM_PORT"))
    ap.add_argument("--api-key", default=env_str("DWS_API_KEY"),
                    help=help_env("bearer token for inference and control routes", "DWS_API_KEY"))
    ap.add_argument("--poll-interval", type=float, default=env_value("DWS_POLL_INTERVAL", 3.0, float),
                    help=help_env("seconds between manifest checks", "DWS_POLL_INTERVAL"))
    ap.add_argument("--verify", choices=["every", "anchors"], default=env_str("DWS_VERIFY", "every"),
                    help=help_env("hash every served weight after resume for every version, or only after anchors; "
                                  "changed positions are read back inside every pause either way", "DWS_VERIFY"))
    ap.add_argument("--tensor-parallel-size", type=_positive_int,
                    default=env_value("DWS_TENSOR_PARALLEL_SIZE", 1, _positive_int),
                    help=help_env("vLLM tensor-parallel size; each rank applies the slice it owns",
                                  "DWS_TENSOR_PARALLEL_SIZE"))
    ap.add_argument("--cache-dir", default=env_str("DWS_CACHE_DIR"),
                    help=help_env("where downloaded and prepared files are kept briefly", "DWS_CACHE_DIR"))
    ap.add_argument("--gpu-memory-utilization", type=float,
                    default=env_value("DWS_GPU_MEMORY_UTILIZATION", 0.3 if _cpu_only() else 0.85, float),
                    help=help_env("vLLM's memory share (CPU memory on CPU)", "DWS_GPU_MEMORY_UTILIZATION"))
    ap.add_argument("--max-model-len", type=int, default=env_value("DWS_MAX_MODEL_LEN", 0, int) or None,
                    help=help_env("vLLM context length (default: the model's)", "DWS_MAX_MODEL_LEN"))
    ap.add_argument("--max-n", type=_positive_int, default=env_value("DWS_MAX_N", 64, _positive_int),
                    help=help_env("largest `n` (completions per request) accepted; more is a 400", "DWS_MAX_N"))
    ap.add_argument("--served-model-name", default=env_str("DWS_SERVED_MODEL_NAME"),
                    help=help_env("model name vLLM answers to", "DWS_SERVED_MODEL_NAME"))
    ap.add_argument("--vllm-args", default=env_str("DWS_VLLM_ARGS", ""),
                    help=help_env("extra `vllm serve` arguments (not --host/--port/--tensor-parallel-size)",
                                  "DWS_VLLM_ARGS"))
    ap.add_argument("--vllm-log", default=env_str("DWS_VLLM_LOG"),
                    help=help_env("file for vLLM's own output", "DWS_VLLM_LOG"))
    ap.add_argument("--no-ui", action="store_true", default=not env_bool("DWS_UI", True),
                    help=help_env("no Gradio page at / (DWS_UI=0)", "DWS_UI"))


def _cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per control call is noise
    log = logging.getLogger("dws.rollout")

    import uvicorn

    from shared.errors import DwsError
    from shared.follower import Follower

    from rollout_space.gateway import GatewayInfo, create_app, mount_ui
    from rollout_space.sync import Syncer
    from rollout_space.vllm_proc import VllmControl, VllmOptions, VllmServer

    if "://" not in args.bucket:
        # A replica may start before the trainer's first publish: an empty local bucket is simply "nothing yet".
        Path(args.bucket).mkdir(parents=True, exist_ok=True)
    try:
        follower = Follower(args.bucket, cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="dws-rollout-"),
                            token=env_str("HF_TOKEN"))
    except DwsError as exc:
        print(f"dws rollout: error: {exc}", file=sys.stderr)
        return 1
    opts = VllmOptions(model=args.model, port=args.vllm_port or free_port(),
                       served_model_name=args.served_model_name, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_model_len=args.max_model_len, extra_args=args.vllm_extra,
                       log_file=Path(args.vllm_log) if args.vllm_log else None,
                       tensor_parallel_size=args.tensor_parallel_size)
    server = VllmServer(opts)
    log.info("dws rollout replica: model %s, bucket %s, gateway on %s:%d, vLLM on 127.0.0.1:%d (TP %d), verify=%s, "
             "poll every %.1fs, auth %s", args.model, follower.bucket.address, args.host, args.port, opts.port,
             args.tensor_parallel_size, args.verify, args.poll_interval,
             "on" if args.api_key else "off (inference open, control disabled)")
    server.start()
    try:
        syncer = Syncer(follower, VllmControl(server.base_url), verify=args.verify, poll_interval=args.poll_interval)
        info = GatewayInfo(model=args.model, bucket=follower.bucket.address, api_key=args.api_key, max_n=args.max_n)
        app = create_app(info=info, server=server, syncer=syncer)
        if not args.no_ui:
            app = mount_ui(app, app.state.status)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
