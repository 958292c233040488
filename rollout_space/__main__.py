"""`python -m rollout_space` / `dws rollout`: a rollout replica (vLLM child on 127.0.0.1 + public gateway).

Every flag has an environment variable of the same name (Space variables/secrets): --bucket/DWS_BUCKET,
--model/DWS_MODEL, --port/PORT, --api-key/DWS_API_KEY, --poll-interval/DWS_POLL_INTERVAL, --verify/DWS_VERIFY,
HF_TOKEN for hf:// buckets and gated models. The token values are never logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
from pathlib import Path

from shared.proc import free_port


def _env(name: str, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="dws rollout", description="Run a dws rollout replica: vLLM (loopback only) "
                                 "that follows a bucket, behind an OpenAI-compatible gateway.")
    ap.add_argument("--model", default=_env("DWS_MODEL"), help="base model: Hub id or local folder [DWS_MODEL]")
    ap.add_argument("--bucket", default=_env("DWS_BUCKET"),
                    help="hf://buckets/<ns>/<name>[/prefix] or a local folder [DWS_BUCKET]")
    ap.add_argument("--host", default=_env("HOST", "0.0.0.0"))
    ap.add_argument("--port", type=int, default=int(_env("PORT", 7860)))
    ap.add_argument("--vllm-port", type=int, default=int(_env("DWS_VLLM_PORT", 0)),
                    help="loopback port for the vLLM child (default: a free one)")
    ap.add_argument("--api-key", default=_env("DWS_API_KEY"),
                    help="bearer token for inference and control routes [DWS_API_KEY]")
    ap.add_argument("--poll-interval", type=float, default=float(_env("DWS_POLL_INTERVAL", 3.0)))
    ap.add_argument("--verify", choices=["every", "anchors"], default=_env("DWS_VERIFY", "every"),
                    help="check the served digest after every version, or only at anchors [DWS_VERIFY]")
    ap.add_argument("--apply-mode", choices=["loader", "direct"], default=_env("DWS_APPLY_MODE", "loader"),
                    help="loader: vLLM's checkpoint-patch loader (fused layouts, TP); direct: in-place index writes "
                         "through the checkpoint view, work proportional to the changed values (TP=1) [DWS_APPLY_MODE]")
    ap.add_argument("--cache-dir", default=_env("DWS_CACHE_DIR"), help="where downloaded files are kept briefly")
    ap.add_argument("--gpu-memory-utilization", type=float,
                    default=float(_env("DWS_GPU_MEMORY_UTILIZATION", 0.3 if _cpu_only() else 0.85)))
    ap.add_argument("--max-model-len", type=int, default=int(_env("DWS_MAX_MODEL_LEN", 0)) or None)
    ap.add_argument("--served-model-name", default=_env("DWS_SERVED_MODEL_NAME"))
    ap.add_argument("--vllm-args", default=_env("DWS_VLLM_ARGS", ""), help="extra `vllm serve` arguments")
    ap.add_argument("--vllm-log", default=_env("DWS_VLLM_LOG"), help="file for vLLM's own output")
    ap.add_argument("--no-ui", action="store_true", help="no Gradio page at /")
    args = ap.parse_args(argv)
    missing = [f for f in ("model", "bucket") if not getattr(args, f)]
    if missing:
        ap.error("missing " + ", ".join(f"--{m} (or DWS_{m.upper()})" for m in missing))
    return args


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
                            token=os.environ.get("HF_TOKEN") or None)
    except DwsError as exc:
        print(f"dws rollout: error: {exc}", file=sys.stderr)
        return 1
    opts = VllmOptions(model=args.model, port=args.vllm_port or free_port(),
                       served_model_name=args.served_model_name, gpu_memory_utilization=args.gpu_memory_utilization,
                       max_model_len=args.max_model_len, extra_args=shlex.split(args.vllm_args),
                       log_file=Path(args.vllm_log) if args.vllm_log else None)
    server = VllmServer(opts)
    log.info("dws rollout replica: model %s, bucket %s, gateway on %s:%d, vLLM on 127.0.0.1:%d, verify=%s, "
             "poll every %.1fs, apply=%s, auth %s", args.model, follower.bucket.address, args.host, args.port, opts.port,
             args.verify, args.poll_interval, args.apply_mode, "on" if args.api_key else "off (inference open, control disabled)")
    server.start()
    try:
        syncer = Syncer(follower, VllmControl(server.base_url), verify=args.verify, poll_interval=args.poll_interval,
                        apply_mode=args.apply_mode)
        info = GatewayInfo(model=args.model, bucket=follower.bucket.address, api_key=args.api_key)
        app = create_app(info=info, server=server, syncer=syncer)
        if not args.no_ui:
            app = mount_ui(app, app.state.status)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
