"""`make demo`: the whole system on one machine with a tiny model and a local-folder bucket.

Until the three services land (issues 4-7), the demo runs the protocol end to end in one process: a trainer takes real
AdamW steps on the tiny model and publishes every version; a follower replays them; `verify` proves the bucket. It
prints the same kind of summary the full demo will (bytes per delta vs the full model, sparsity, bit-exactness).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("dws.demo")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make demo")
    ap.add_argument("--dir", default=".dws/demo", help="work folder (ignored by git)")
    ap.add_argument("--bucket", default=None, help="bucket address (default: <dir>/bucket, a local folder)")
    ap.add_argument("--model", default=None, help="model folder or Hub id (default: the tiny model built in <dir>)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-6)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from shared.digest import weights_digest
    from shared.errors import DwsError
    from shared.follower import Follower
    from shared.publisher import Publisher
    from shared.tiny_model import build_tiny_model
    from shared.verify import verify_bucket

    work = Path(args.dir)
    bucket = args.bucket or str(work / "bucket")
    if args.bucket is None and Path(bucket).exists():
        shutil.rmtree(bucket)  # a fresh history each run; a user-given bucket is never wiped
    model_ref = args.model or str(build_tiny_model(work / "tiny-model"))
    print(f"dws demo: model {model_ref}, bucket {bucket}, {args.steps} AdamW steps at lr {args.lr}")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        follower_state: dict = {}
        served: int | None = None
        bit_exact = 0
        with Publisher(bucket, model_name=model_ref, anchor_every=5) as pub:
            follower = Follower(bucket)
            # A user-given bucket may hold an earlier run: continue its version numbers instead of clashing.
            first = 0 if pub.latest_version is None else pub.latest_version + 1
            for step in range(first, first + args.steps + 1):
                if step > first:
                    ids = torch.randint(0, 256, (4, 32))
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
                pub.publish(dict(model.named_parameters()), step)
                pub.flush()
                t0 = time.perf_counter()
                served = follower.sync_state(follower_state, served)
                sync_ms = (time.perf_counter() - t0) * 1e3
                ok = weights_digest(follower_state) == pub.reports[-1].digest
                bit_exact += ok
                r = pub.reports[-1]
                print(f"  v{step:<3} {'+'.join(r.kinds):<13} {r.bytes:>10,} B  changed {100 * r.changed / r.total:6.2f}%  "
                      f"replica sync {sync_ms:6.1f} ms  bit-exact {'yes' if ok else 'NO'}")
        deltas = [r for r in pub.reports if r.delta_bytes]
        full = 2 * pub.reports[0].total
        verdict = verify_bucket(bucket)
    except (DwsError, OSError, ValueError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    med = statistics.median(r.delta_bytes for r in deltas) if deltas else 0
    print("\nsummary")
    print(f"  versions published        {len(pub.reports)}")
    print(f"  full model (bf16)         {full:,} B")
    print(f"  median delta              {med:,.0f} B  ({full / max(med, 1):.0f}x smaller)")
    print(f"  median bytes/changed elem {statistics.median(r.delta_bytes / r.changed for r in deltas):.3f}  (raw: 6.0)")
    print(f"  median sparsity           {100 * statistics.median(r.sparsity for r in deltas):.2f}% unchanged")
    print(f"  versions bit-exact        {bit_exact}/{len(pub.reports)}")
    print(f"  dws verify                {'OK' if verdict.ok else 'FAILED'}")
    print("\nThe rollout (vLLM), env and trainer services join this demo as issues 4-7 land.")
    return 0 if verdict.ok and bit_exact == len(pub.reports) else 1


if __name__ == "__main__":
    sys.exit(main())
