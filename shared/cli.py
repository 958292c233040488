"""The `dws` console script: the protocol's own commands, plus every other command found by registry.

    dws inspect FILE [--model DIR]   what an anchor/delta holds (ours or TRL's layout; shapes checked given a model)
    dws verify BUCKET                replay the chain from the oldest kept anchor; check every sha256 and digest

Every other command -- `dws rollout | train | env` (each Space's entrypoint) and the operator tools `dws demo |
tiny-model | spaces` -- is an entry point in the `dws.commands` group (pyproject.toml) naming a `main(argv) -> int`.
This module never names a Space or a tool: a command whose package is not installed here (the env image holds no
trainer) is reported as such with the dependency set it needs, and nothing heavy is imported until a command runs,
so `dws --help` works in every Space's environment. Errors print one clear line and exit non-zero; tracebacks are
for bugs only.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from shared.errors import DwsError

EXIT_FAIL = 1
EXIT_USAGE = 2
COMMAND_GROUP = "dws.commands"


def _model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint -- a model folder, a TRL `anchor_step_*` folder or one safetensors file -- read
    from the safetensors headers alone (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DwsError(f"{path}: no safetensors checkpoint there (want a model folder or a .safetensors file)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    shapes[k] = tuple(st.get_slice(k).get_shape())
        except (SafetensorError, OSError) as exc:
            raise DwsError(f"{f}: not a readable safetensors file ({exc})") from None
    return shapes


def inspect_file(path: Path, *, shapes: dict[str, tuple[int, ...]] | None) -> dict:
    """What `dws inspect` reports, as data. TRL-layout deltas store no shapes: without `shapes` their positions
    are listed unchecked; with them, every name and position is checked and densities are given."""
    from shared.formats import file_kind_summary, read_patch_file
    from shared.parts import is_part_file, read_part

    part = None
    if is_part_file(path):
        # A part holds row slices: checked against the model's full shapes, its tensors are the slices.
        pf, part = read_part(path, shapes=shapes)
        shapes = None
    else:
        pf = read_patch_file(path, shapes=shapes, allow_unknown_shapes=shapes is None)
    summary = file_kind_summary(pf, path.stat().st_size)
    if part is not None:
        summary["part"] = f"{part.index} of {part.count} ({part.layout})"
    per: dict[str, dict] = {}
    for name, t in pf.tensors.items():
        # A base-context (ctx) delta tensor is not decoded here: its header knows the count.
        n = int(t.count) if pf.kind == "delta" else int(t.numel())
        row: dict = {"changed": n}
        numel = None
        if shapes is not None and name in shapes:
            numel = 1
            for s in shapes[name]:
                numel *= int(s)
        elif name in pf.shapes and pf.shapes[name] and max(pf.shapes[name]) < 2**62:
            numel = 1
            for s in pf.shapes[name]:
                numel *= int(s)
        if numel is not None and pf.kind == "delta":
            row["numel"] = numel
            row["density"] = round(n / numel, 6) if numel else 0.0
        if part is not None and name in part.slices:
            row["rows"] = list(part.slices[name])
        per[name] = row
    if shapes is not None:
        if pf.kind == "anchor":
            wrong = {k: (pf.shapes[k], shapes.get(k)) for k in pf.shapes if tuple(shapes.get(k, ())) != pf.shapes[k]}
            if wrong:
                k, (got, want) = next(iter(wrong.items()))
                raise DwsError(f"{path.name}: {len(wrong)} tensor(s) do not match the model, e.g. {k}: "
                               f"{list(got)} vs {list(want) if want is not None else 'absent'}")
        total = sum(int(v["numel"]) for v in per.values() if "numel" in v)
        summary["model_elements"] = sum(_numel(s) for s in shapes.values())
        if pf.kind == "delta" and total:
            summary["density"] = round(pf.changed / summary["model_elements"], 6)
        summary["checked_against_model"] = True
    summary["per_tensor"] = per
    return summary


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise DwsError(f"{path}: no such file")
    shapes = None
    if args.manifest and args.model:
        raise DwsError("give --model or --manifest, not both")
    if args.manifest:
        from shared.manifest import Manifest

        shapes = Manifest.from_bytes(Path(args.manifest).read_bytes()).model.shapes
    elif args.model:
        shapes = _model_shapes(Path(args.model))
    summary = inspect_file(path, shapes=shapes)
    per = summary.pop("per_tensor")
    if args.json:
        if args.tensors:
            summary["per_tensor"] = per
        print(json.dumps(summary, indent=1))
        return 0
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    if args.tensors:
        for name, row in per.items():
            dens = f" of {row['numel']:,} ({row['density']:.4%})" if "density" in row else ""
            print(f"  {name}: {row['changed']:,}{dens}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from shared.verify import verify_bucket

    result = verify_bucket(args.bucket, token=args.token)
    for line in result.lines:
        print(line)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    return 0 if result.ok else EXIT_FAIL


def registered_commands() -> dict[str, EntryPoint]:
    """`dws.commands` entry points by name (pyproject.toml), the protocol's own commands excluded."""
    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP) if ep.name not in ("inspect", "verify")}


def _summary(ep: EntryPoint) -> str:
    """The first line of the command module's docstring, read from its source without importing it (importing a
    Space's entrypoint may need torch or vLLM, which `dws --help` must not)."""
    try:
        spec = importlib.util.find_spec(ep.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return f"(not installed in this environment: {ep.module})"
    try:
        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text()))
    except (OSError, SyntaxError):
        doc = None
    return (doc or ep.module).strip().splitlines()[0]


def _run_registered(ep: EntryPoint):
    def run(args: argparse.Namespace) -> int:
        # The dependency set is the extra named by the entry point's package ("<x>_space" -> "<x>"); the
        # operator tools live in the trainer set.
        pkg = ep.module.split(".")[0]
        extra = pkg.split("_")[0] if pkg.endswith("_space") else "trainer"
        try:
            return int(ep.load()(args.rest) or 0)
        except ModuleNotFoundError as exc:
            # Entrypoints import their heavy dependencies when they run, so a missing set surfaces here too.
            raise DwsError(f"`dws {ep.name}` cannot run in this environment ({exc}); it needs the '{extra}' "
                           f"dependency set: pip install 'dws[{extra}]'") from None

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dws", description="Delta Weight Sync: lossless sparse bf16 weight deltas "
                                "from an RL trainer to vLLM replicas through a Hub bucket.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("inspect", help="describe an anchor or delta file (dws or TRL layout)",
                       description="Describe an anchor or delta file: kind, version, base, encoding, changed "
                       "elements, bytes per changed element. TRL-layout deltas store no shapes: give the model "
                       "(--model, a folder or a TRL anchor_step_* checkpoint) to check names and positions and get "
                       "densities.")
    s.add_argument("file")
    s.add_argument("--model", help="model folder, TRL anchor_step_* folder or .safetensors giving the shapes")
    s.add_argument("--manifest", help="a bucket's manifest.json giving the shapes")
    s.add_argument("--tensors", action="store_true", help="also list changed elements (and density) per tensor")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("verify", help="replay a bucket's chain and check every sha256 and digest")
    s.add_argument("bucket", help="hf://buckets/<ns>/<name>[/prefix], a folder, or file://…")
    s.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_verify)

    for name, ep in sorted(registered_commands().items()):
        s = sub.add_parser(name, help=_summary(ep), add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_run_registered(ep), registered=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # A registered command's flags (including its own --help) belong to that command's parser, not to ours.
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "registered", False):
        args.rest = [*unknown, *args.rest]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "registered", False):
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
