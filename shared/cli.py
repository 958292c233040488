"""The `dws` console script: protocol tools plus one entry point per Space.

    dws tiny-model DIR          build the deterministic tiny Qwen3 checkpoint used by tests and the demo
    dws inspect FILE            what an anchor/delta holds (kind, version, base, changed elements, bytes/element)
    dws verify BUCKET           replay the chain from the oldest kept anchor; check every sha256 and digest
    dws rollout | train | env   run a Space's service (each needs that Space's dependency set)
    dws spaces deploy           create/update the bucket and the three Hugging Face Spaces (shared/spaces.py)

Subcommands import their heavy dependencies (torch, vLLM, OpenEnv) only when they run, so `dws --help` works in every
Space's environment. Errors print one clear line and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from shared.errors import DwsError

EXIT_FAIL = 1
EXIT_USAGE = 2


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from shared.tiny_model import build_tiny_model

    out = build_tiny_model(args.dir, seed=args.seed)
    print(f"tiny Qwen3 model written to {out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from shared.formats import file_kind_summary, read_patch_file

    path = Path(args.file)
    if not path.is_file():
        raise DwsError(f"{path}: no such file")
    shapes = None
    if args.manifest:
        from shared.manifest import Manifest

        shapes = Manifest.from_bytes(Path(args.manifest).read_bytes()).model.shapes
    pf = read_patch_file(path, shapes=shapes)
    summary = file_kind_summary(pf, path.stat().st_size)
    if args.tensors:
        summary["per_tensor"] = {
            name: (int(t.positions.size) if pf.kind == "delta" else int(t.numel())) for name, t in pf.tensors.items()
        }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        width = max(len(k) for k in summary)
        for k, v in summary.items():
            if k != "per_tensor":
                print(f"{k:<{width}}  {v}")
        for name, n in summary.get("per_tensor", {}).items():
            print(f"  {name}: {n} changed")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from shared.verify import verify_bucket

    result = verify_bucket(args.bucket, token=args.token)
    for line in result.lines:
        print(line)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    return 0 if result.ok else EXIT_FAIL


def _space(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        extra = module.split("_")[0]  # rollout_space -> rollout, trainer_space -> trainer, env_space -> env
        try:
            mod = importlib.import_module(f"{module}.__main__")  # the Space's entrypoint (python -m <module>)
            return int(mod.main(args.rest) or 0)
        except ImportError as exc:
            # Each Space has its own dependency set (DESIGN.md §2); say which one is missing instead of a traceback.
            raise DwsError(f"{module} cannot run in this environment ({exc}); it needs the '{extra}' dependency set: "
                           f"pip install 'dws[{extra}]'") from None

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dws", description="Delta Weight Sync: lossless sparse bf16 weight deltas "
                                "from an RL trainer to vLLM replicas through a Hub bucket.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("tiny-model", help="write the deterministic tiny Qwen3 checkpoint")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_tiny_model)

    s = sub.add_parser("inspect", help="describe an anchor or delta file")
    s.add_argument("file")
    s.add_argument("--manifest", help="manifest.json giving shapes (needed for TRL-layout deltas)")
    s.add_argument("--tensors", action="store_true", help="also list changed elements per tensor")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("verify", help="replay a bucket's chain and check every sha256 and digest")
    s.add_argument("bucket", help="hf://buckets/<ns>/<name>[/prefix], a folder, or file://…")
    s.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_verify)

    for name, module, text in (("rollout", "rollout_space", "run a rollout replica (vLLM + gateway)"),
                               ("train", "trainer_space", "run the GRPO trainer and its dashboard"),
                               ("env", "env_space", "run the environment server")):
        s = sub.add_parser(name, help=text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_space(module))

    from shared.spaces import configure_parser  # stdlib-only at import time, like this module

    configure_parser(sub.add_parser("spaces", help="deploy the Hugging Face Spaces (dws spaces deploy --help)"))
    return p


SPACE_COMMANDS = ("rollout", "train", "env")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A Space's flags (including its own --help) belong to that Space's parser, not to ours.
    args, unknown = parser.parse_known_args(argv)
    if args.command in SPACE_COMMANDS:
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except DwsError as exc:
        print(f"dws {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except (OSError, ValueError) as exc:
        print(f"dws {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
