"""A plain FSDP2 training loop that publishes every version with `ShardedPublisher` -- the runnable example of
hooking it into a sharded trainer, and the worker of tests/shared/test_sharded.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/shared/sharded_worker.py \\
        --model DIR --bucket DIR --versions 5 [--dump DIR] [--kill-rank R --kill-version V]

Every rank: gloo process group, the tiny Qwen3 with `fully_shard` on each decoder layer and the root (its
parameters become DTensors sharded on dim 0), AdamW on its own random token batch, then -- on every rank, at the
same step -- `pub.publish(model.named_parameters(), version)`. No rank gathers anything. A restarted run continues
at the bucket's latest version + 1, loading its own rows of the bucket's latest weights (`restored_rows`).

Test hooks (not for users): `--dump` saves each rank's published rows per version (the test's reference);
`--kill-rank/--kill-version` makes that rank store half of its part of that version and SIGKILL itself, the way a
crashed or preempted machine leaves a torn upload.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when run as a script by torchrun

from shared.bucket.local import LocalBucket  # noqa: E402
from shared.sharded import ShardedPublisher  # noqa: E402


def _no_gather(*args, **kwargs):
    raise AssertionError("ShardedPublisher must never gather or redistribute a sharded parameter")


class KillingBucket(LocalBucket):
    """Stores half of one part file, non-atomically, then SIGKILLs this process (a rank dying mid-upload)."""

    def __init__(self, root, *, kill_path: str | None):
        super().__init__(root, create=True)
        self.kill_path = kill_path

    def upload(self, local_path, path):
        if self.kill_path is not None and path == self.kill_path:
            data = Path(local_path).read_bytes()
            dest = self._p(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        super().upload(local_path, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--bucket", required=True)
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--anchor-every", type=int, default=3)
    ap.add_argument("--keep-anchors", type=int, default=2)
    ap.add_argument("--encoding", default="compact")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--kill-rank", type=int, default=None)
    ap.add_argument("--kill-version", type=int, default=None)
    args = ap.parse_args()

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from shared.manifest import part_path

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (world,))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    kill = None
    if args.kill_rank == rank and args.kill_version is not None:
        kill = part_path(args.kill_version, rank, world, anchor=False)
    bucket = KillingBucket(args.bucket, kill_path=kill)
    pub = ShardedPublisher(bucket, anchor_every=args.anchor_every, keep_anchors=args.keep_anchors,
                           encoding=args.encoding, run_id="sharded-test",
                           commit_timeout_s=120, lease_settle_s=0.0)
    start = 0 if pub.latest_version is None else pub.latest_version + 1
    restored = pub.restored_rows()
    if restored is not None:
        # Continue from the bucket's weights: this rank's rows only, written into its own local shards.
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.to_local().copy_(restored[name].to(torch.float32))
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank trains on its own batch, as data parallelism does
    for i in range(args.versions):
        version = start + i
        if i > 0 or restored is not None:
            ids = torch.randint(0, 256, (2, 16), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        # Proof that publishing gathers nothing: while it snapshots, a DTensor cannot be gathered or redistributed
        # at all (the background encode and upload touch only this rank's CPU copy of its rows).
        saved = DTensor.full_tensor, DTensor.redistribute
        DTensor.full_tensor = DTensor.redistribute = _no_gather
        try:
            pub.publish(model.named_parameters(), version)
        finally:
            DTensor.full_tensor, DTensor.redistribute = saved
        if args.dump:
            rows = {n: p.to_local().detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}
            torch.save(rows, Path(args.dump) / f"v{version}.rank{rank}.pt")
    pub.close()
    if rank == 0:
        print(f"PUBLISHED {start}..{start + args.versions - 1} latest v{pub.latest_version}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
