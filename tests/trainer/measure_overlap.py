"""Seconds per step with and without generation overlapping training, measured on this machine (run by hand; not a
test: timings belong in measurements, never in assertions).

    .venv/trainer/bin/python tests/trainer/measure_overlap.py [--steps 12] [--rounds 2] [--task letter]

Starts a real env_space and one rollout gateway (CPU vLLM, tiny model) like the trainer suite, then trains the same
configuration in alternating rounds -- overlap off, overlap on at staleness bound 1, overlap on at bound 2 -- each a
restart on the same bucket, and prints the mean seconds per step (step 1 of each run excluded: nothing precedes it
to overlap with) split into generation waited for, generation hidden behind training, scoring, training and the
blocking part of publishing. The defaults keep the work per step realistic for the tiny model: a small learning
rate so that it does not collapse to one-token replies, and 32-token completions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parents[1])]

from trainer_helpers import cfg_for, start_env, start_gateway  # noqa: E402

KEYS = ("step_s", "generate_s", "hidden_generate_s", "score_s", "train_s", "publish_block_s")
MODES = {"no overlap": dict(overlap=False, staleness=1), "overlap, bound 1": dict(overlap=True, staleness=1),
         "overlap, bound 2": dict(overlap=True, staleness=2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--task", default="letter")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-completion-length", type=int, default=32)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from dws_tools.tiny_model import build_tiny_model
    from trainer_space.grpo import train
    from trainer_space.state import RunState

    root = Path(tempfile.mkdtemp(prefix="dws-overlap-"))
    model = build_tiny_model(root / "model")
    env = start_env(root)
    gw = None
    rows: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        gw = start_gateway(model, root / "bucket", root)
        services = {"root": root, "bucket": root / "bucket", "model": model, "env": env, "gw": gw}
        common = dict(task=args.task, lr=args.lr, max_completion_length=args.max_completion_length)
        train(cfg_for(services, steps=3, **common), state=RunState())  # warm-up: v0, replica synced, caches filled
        for _ in range(args.rounds):
            for mode, kw in MODES.items():
                run = train(cfg_for(services, steps=args.steps, **common, **kw), state=RunState())
                rows[mode] += run.state.snapshot()["steps"][1:]
    finally:
        if gw is not None:
            gw.stop()
        env.stop()
    figures = {m: {k: round(sum(r.get(k, 0.0) for r in rs) / len(rs), 4) for k in KEYS} | {"steps": len(rs)}
               for m, rs in rows.items()}
    print(f"{'mode':<18}" + "".join(f"{k:>18}" for k in KEYS))
    for m, f in figures.items():
        print(f"{m:<18}" + "".join(f"{f[k]:>18.3f}" for k in KEYS))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
