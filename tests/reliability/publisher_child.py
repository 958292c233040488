"""A trainer stand-in for the kill tests: `python publisher_child.py BUCKET N` publishes N versions, then exits.

Like the trainer it resumes from the bucket's latest version (newest anchor + deltas) and continues numbering, under
a fixed run id (a restarted trainer Space keeps its SPACE_ID), so its `owner.json` lease lets it continue at once.
Each optimizer "step" moves ~2 % of a ~0.8 M-element model. After every committed version it prints
`COMMITTED <version> <digest>`; the test kills it (SIGKILL) at chosen moments -- DWS_FAULTS_FILE can pace or stall
its writes through the `faulty://` bucket -- and compares the bucket with what it had reported committed.
"""

from __future__ import annotations

import sys

import torch

import faulty_bucket  # noqa: F401 -- registers faulty://
from shared.follower import Follower
from shared.publisher import Publisher

SHAPES = {"embed.weight": (512, 512), "layers.0.mlp.weight": (1024, 256), "layers.1.mlp.weight": (1024, 256),
          "norm.weight": (512,)}
RUN_ID = "kill-test"


def step(state: dict[str, torch.Tensor], version: int) -> None:
    g = torch.Generator().manual_seed(version)
    for name, t in state.items():
        flat = t.view(-1)
        k = max(1, flat.numel() // 50)
        idx = torch.randint(0, flat.numel(), (k,), generator=g)
        flat[idx] += 0.02 * torch.randn(k, generator=g)


def main() -> int:
    bucket, count = sys.argv[1], int(sys.argv[2])
    pub = Publisher(bucket, run_id=RUN_ID, anchor_every=3, keep_anchors=2, lease_settle_s=0)
    if pub.latest_version is None:
        g = torch.Generator().manual_seed(0)
        state = {k: torch.randn(s, generator=g) * 0.02 for k, s in SHAPES.items()}
        start = 0
    else:
        latest, bf16 = Follower(pub.bucket).materialize()
        state = {k: v.float() for k, v in bf16.items()}
        start = latest + 1
    print(f"START {start}", flush=True)
    for v in range(start, start + count):
        if v:
            step(state, v)
        pub.publish(state, v)
        pub.flush()
        print(f"COMMITTED {v} {pub.reports[-1].digest}", flush=True)
    pub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
