"""Codec cost on a synthetic delta, side by side with `torch.ne`, in a fresh process: a quick check of a codec change.

`bench/run.py` times the codec on real AdamW deltas inside the process that trained them (the model, its gradients
and AdamW's moments resident: that is where a publisher runs). This script needs no training: every matrix of a
Qwen3-0.6B-shaped model (or `--layers` of them) is N(0, 0.02) weights, the next version adds N(0, `--lr`) to each
(about 4 % of bf16 weights change at 1.2e-6), norms stay unchanged (they do under AdamW at these rates: their ulp at
1.0 is 2**-7). Each round times one `torch.ne` pass over the model, then detect + encode and decode for each
encoding; every ratio is the median of the rounds' ratios (`run.codec_rounds`, what `make bench` times).

To compare two revisions, time them in the same process: ``--against CHECKOUT`` imports that checkout's `shared`
package under another name (``shared_against``: a copy with its imports of `shared` renamed) and times its detect +
encode and decode in the same rounds (``...@against``), on the same states, taking turns going first; each of ours
also gets its time over its counterpart's, the median of per-round ratios (``over_pair``) -- runs in two processes
minutes apart differ by tens of percent on this VM whatever the code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import CODECS, codec_rounds  # noqa: E402
from shared import codec  # noqa: E402
from shared.formats import diff_state, encode_delta  # noqa: E402


def shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Qwen3-0.6B's tensors (hidden 1024, 16/8 heads of 128, intermediate 3072), tied embedding first."""
    out: dict[str, tuple[int, ...]] = {"embed": (vocab, 1024), "norm": (1024,)}
    for i in range(layers):
        out |= {f"{i}.q": (2048, 1024), f"{i}.k": (1024, 1024), f"{i}.v": (1024, 1024), f"{i}.o": (1024, 2048),
                f"{i}.gate": (3072, 1024), f"{i}.up": (3072, 1024), f"{i}.down": (1024, 3072),
                f"{i}.q_norm": (128,), f"{i}.k_norm": (128,), f"{i}.in_norm": (1024,), f"{i}.post_norm": (1024,)}
    return out


def versions(layers: int, vocab: int, lr: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    prev, cur = {}, {}
    for name, shape in shapes(layers, vocab).items():
        if len(shape) == 1:
            prev[name] = torch.ones(shape, dtype=torch.bfloat16)
            cur[name] = prev[name].clone()
            continue
        master = torch.randn(shape, generator=g) * 0.02
        prev[name] = master.bfloat16()
        cur[name] = (master + torch.randn(shape, generator=g) * lr).bfloat16()
    return prev, cur


def load_against(checkout: Path):
    """`checkout`'s `shared.formats`, imported as ``shared_against.formats`` from a copy of its package whose imports
    of `shared` are renamed (the two revisions' modules must not share names, or one would shadow the other)."""
    src = Path(checkout) / "shared"
    if not (src / "formats.py").is_file():
        raise FileNotFoundError(f"{checkout} holds no shared/formats.py")
    root = Path(tempfile.mkdtemp(prefix="dws-against-"))
    dst = root / "shared_against"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.rglob("*.py"):
        f.write_text(re.sub(r"\b(from|import) shared\b", r"\1 shared_against", f.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("shared_against.formats")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/synthetic.py", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--lr", type=float, default=1.2e-6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the results as JSON here")
    ap.add_argument("--against", default="", help="another checkout, timed in the same rounds (@against)")
    args = ap.parse_args(argv)
    if args.layers < 0 or args.vocab < 1 or args.repeats < 1 or args.lr <= 0:
        ap.error("--layers >= 0, --vocab >= 1, --repeats >= 1 and --lr > 0")
    try:
        against = load_against(Path(args.against)) if args.against else None
    except (OSError, ImportError, SyntaxError) as exc:
        ap.error(f"--against {args.against}: {exc}")
    prev, cur = versions(args.layers, args.vocab, args.lr, args.seed)
    total = sum(t.numel() for t in cur.values())
    codec.warm_up()
    tmp = Path(tempfile.mkdtemp(prefix="dws-synthetic-"))
    paths, changed = {}, 0
    for enc in CODECS:
        changes = diff_state(cur, prev, encoding=enc)
        changed = sum(ch.positions.size for ch in changes.values())
        paths[enc] = tmp / f"{enc}.safetensors"
        paths[enc].write_bytes(encode_delta(changes, version=1, base=0, total=total, encoding=enc))
    del changes
    if against is not None:  # its kernels compile here (a fresh copy has no numba cache), not inside a timed round
        importlib.import_module("shared_against.codec").warm_up()
    res = codec_rounds(prev, cur, paths, version=1, repeats=args.repeats, against=against)
    print(f"synthetic: {total:,} weights, {changed:,} changed ({100 * changed / max(total, 1):.2f} %), "
          f"{torch.get_num_threads()} threads, medians of {args.repeats} rounds")
    for name, r in res.items():
        pair = f"  {r['over_pair']:5.3f}x its @against (median of per-round ratios)" if "over_pair" in r else ""
        print(f"  {name:30s} {1e3 * r['median_s']:8.1f} ms  {r['over_ne_pass']:5.2f}x torch.ne"
              f"  {r['over_ne_kept']:5.2f}x kept{pair}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "changed": int(changed), "total": int(total),
                                              "time": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
