"""`make bench` (replica half): what a sync costs a real vLLM replica, measured through the production gateway.

One replica (`python -m rollout_space`, vLLM on CPU) is started from a base model that is *not* in the bucket, at a
moment when the bucket's latest version is an anchor: its first sync is therefore a full-weight reload through the
plugin (dense anchor). Then every following version is a sparse delta on the same server. For both: the inference
pause (pause -> resume), the apply time inside it, the bytes downloaded, and, for deltas, the latency from the
trainer's publish() call to the replica serving that version (local-folder bucket, 0.2 s polling). vLLM's resident
memory (its process tree) is sampled after start-up and after all syncs. Run it in the rollout venv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from dws_testing import TinyTrainer, free_port  # noqa: E402
from shared.publisher import Publisher  # noqa: E402
from dws_tools.tiny_model import build_tiny_model  # noqa: E402

SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, vocab_size=32000)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (vLLM runs an engine core and workers)."""
    pids, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        for c in map(int, children):
            if c not in pids:
                pids.add(c)
                frontier.append(c)
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/replica.py")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--deltas", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--apply-mode", choices=["loader", "direct"], default="loader")
    ap.add_argument("--verify", choices=["every", "anchors"], default="every")
    ap.add_argument("--out", default="bench/replica.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dws-bench-replica-"))
    over = SMALL if args.size == "small" else {}
    trained = build_tiny_model(work / "model", seed=0, **over)
    other = build_tiny_model(work / "other-base", seed=1, **over)  # not any bucket version: forces an anchor
    trainer = TinyTrainer(trained, lr=args.lr)
    bucket = work / "bucket"
    n_params = sum(p.numel() for p in trainer.params().values())
    pub = Publisher(bucket, anchor_every=1000, anchor_fraction=1000.0)
    pub.publish(trainer.params(), 0)
    pub.flush()
    pub.close()
    port = free_port()
    env = dict(os.environ, DWS_API_KEY="bench", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rollout_space", "--model", str(other), "--bucket", str(bucket), "--host",
           "127.0.0.1", "--port", str(port), "--poll-interval", "0.2", "--max-model-len", "512", "--no-ui",
           "--vllm-args=--enforce-eager", "--apply-mode", args.apply_mode, "--verify", args.verify, "--vllm-log", str(work / "vllm.log")]
    proc = subprocess.Popen(cmd, env=env, stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        def status():
            return http.get("/status").json()

        def wait_for(v, timeout=300):
            deadline = time.time() + timeout
            while time.time() < deadline:
                try:
                    st = status()
                    if st["served_version"] == v and not st["syncing"]:
                        return st
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            raise SystemExit(f"replica never reached v{v}; see {work}/gateway.log")

        anchor = wait_for(0, timeout=900)["last_sync"]
        rss_start = tree_rss_mb(status()["vllm_pid"])
        print(f"[replica bench] {n_params:,} params; anchor reload: pause {anchor['pause_s'] * 1e3:.1f} ms, "
              f"apply {anchor['apply_s'] * 1e3:.1f} ms, {anchor['bytes']:,} B", flush=True)
        deltas = []
        with Publisher(bucket) as pub:
            for v in range(1, args.deltas + 1):
                trainer.step()
                t0 = time.perf_counter()
                pub.publish(trainer.params(), v)
                st = wait_for(v)
                latency = time.perf_counter() - t0
                last = st["last_sync"]
                assert st["digest_match"] is (True if args.verify == "every" else None), st
                deltas.append({"version": v, "pause_s": last["pause_s"], "apply_s": last["apply_s"],
                               "bytes": last["bytes"], "download_s": last["download_s"], "publish_to_serving_s": latency})
                print(f"[replica bench] v{v}: pause {last['pause_s'] * 1e3:.1f} ms, apply {last['apply_s'] * 1e3:.1f} ms, "
                      f"{last['bytes']:,} B, publish->serving {latency * 1e3:.0f} ms", flush=True)
        rss_end = tree_rss_mb(status()["vllm_pid"])
    finally:
        proc.terminate()
        proc.wait(60)
    med = lambda k: statistics.median(d[k] for d in deltas)  # noqa: E731
    res = {
        "date": time.strftime("%Y-%m-%d"), "size": args.size, "parameters": n_params, "apply_mode": args.apply_mode, "verify": args.verify,
        "lr": args.lr, "cpus": os.cpu_count(),
        "anchor": {"pause_s": anchor["pause_s"], "apply_s": anchor["apply_s"], "bytes": anchor["bytes"]},
        "delta_median": {k: med(k) for k in ("pause_s", "apply_s", "bytes", "download_s", "publish_to_serving_s")},
        "delta_pause_over_anchor_pause": med("pause_s") / anchor["pause_s"],
        "delta_apply_over_anchor_apply": med("apply_s") / anchor["apply_s"],
        "vllm_rss_mb": {"after_start_and_anchor": rss_start, "after_deltas": rss_end},
        "deltas": deltas,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    d = res["delta_median"]
    print(f"\n| path | pause ms | apply ms | bytes |\n|---|---|---|---|\n"
          f"| anchor (full reload) | {anchor['pause_s'] * 1e3:.1f} | {anchor['apply_s'] * 1e3:.1f} | {anchor['bytes']:,} |\n"
          f"| delta (median of {len(deltas)}) | {d['pause_s'] * 1e3:.1f} | {d['apply_s'] * 1e3:.1f} | {d['bytes']:,.0f} |\n"
          f"\ndelta pause / anchor pause = {res['delta_pause_over_anchor_pause']:.3f}; publish -> serving median "
          f"{d['publish_to_serving_s'] * 1e3:.0f} ms; vLLM RSS {rss_start:.0f} -> {rss_end:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
