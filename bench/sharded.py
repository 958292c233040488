"""Sharded publishing: host memory and time of the sync per rank, one process vs N ranks (Qwen3-0.6B-shaped).

    .venv/trainer/bin/python bench/sharded.py [--ranks 1 2] [--versions 4] [--density 0.065] [--quick]

Each configuration runs in fresh processes: `single` is today's `Publisher` in one process holding the whole model;
`sharded-N` is `ShardedPublisher` under `torchrun --nproc_per_node N` (gloo), every rank holding only its rows as
DTensors sharded on dim 0 (`DTensor.from_local`, FSDP2's placement) -- no training, so the figures are the sync's
own. Every process holds fp32 master weights (its rows); a "step" changes `--density` of the elements (a 1 %
relative nudge in fp32, which always changes the bf16 value: the lr 3e-6 scenario of bench/run.py changes 6.5 % per
step). Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs before each publish) minus the
resident set before the publisher existed -- i.e. what the sync adds to a trainer that already holds its weights,
including the previous version's bf16 rows it keeps. Time: the publisher's own per-version phases (snapshot, encode,
digest, upload) on each rank. Results: bench/sharded.json.

`--restart` measures the other half, a restart (results: bench/sharded-restart.json): a history of an anchor and one
delta is written once by the single-process Publisher and once by 2 ranks, then restored by fresh processes --
`ShardedPublisher` at 2 ranks on the 2-part history (each rank reads its own part), at 2 ranks on the single-file
history and at 1 rank on the 2-part history (both re-split: each rank reads the files that overlap its rows), and
the alternative a re-split replaces: every rank rebuilding the whole model (`Follower.materialize`) and keeping its
rows. Per rank: restore time, bytes read from the bucket, peak resident set added.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN3_06B = dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, inter=3072, layers=28, vocab=151936)
TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=128, layers=2, vocab=320)


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor shapes of a Qwen3 with tied embeddings (no lm_head.weight), as the checkpoint names them."""
    h, q, kv, i = cfg["hidden"], cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"], cfg["inter"]
    out = {"model.embed_tokens.weight": (cfg["vocab"], h), "model.norm.weight": (h,)}
    for n in range(cfg["layers"]):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "self_attn.q_norm.weight": (cfg["head_dim"],), p + "self_attn.k_norm.weight": (cfg["head_dim"],),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
                    p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _step(params, density: float, gen) -> None:
    """Change `density` of each local tensor's elements, in chunks (no model-sized temporaries)."""
    import torch

    for t in params.values():
        flat = t.view(-1)
        for s in range(0, flat.numel(), 1 << 22):
            c = flat[s:s + (1 << 22)]
            mask = torch.rand(c.numel(), generator=gen) < density
            c[mask] *= 1.01


def worker(args) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sharded = args.mode == "sharded"
    torch.set_num_threads(1)  # the benchmark's ranks share two cores: one thread each, for every configuration
    full = shapes(TINY if args.quick else QWEN3_06B)
    gen = torch.Generator().manual_seed(1234 + rank)
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        from shared.parts import rows_of

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        local = {}
        for n, s in full.items():
            r0, r1 = rows_of(s, rank, world)
            local[n] = torch.randn((r1 - r0, *s[1:]), generator=gen) * 0.02
        params = {n: DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=full[n],
                                        stride=torch.empty(full[n], device="meta").stride())
                  for n, t in local.items()}
    else:
        local = {n: torch.randn(s, generator=gen) * 0.02 for n, s in full.items()}
        params = local
    import gc

    gc.collect()
    base_kb = _status_kb("VmRSS")
    bucket = Path(args.bucket)
    if sharded:
        from shared.sharded import ShardedPublisher

        pub = ShardedPublisher(bucket, anchor_every=100, anchor_fraction=100.0, keep_anchors=1, run_id="bench",
                               lease_settle_s=0.0, spool_dir=Path(args.spool) / f"r{rank}")
    else:
        from shared.publisher import Publisher

        pub = Publisher(bucket, anchor_every=100, anchor_fraction=100.0, keep_anchors=1, run_id="bench",
                        lease_settle_s=0.0, spool_dir=Path(args.spool) / "single")
    rows = []
    for v in range(args.versions):
        if v:
            _step(local, args.density, gen)
        gc.collect()
        before_kb = _status_kb("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        fut = pub.publish(params, v)
        blocking = time.perf_counter() - t0
        pub.flush()
        rep = fut.result()
        peak_kb = _status_kb("VmHWM")
        d = rep.as_dict()
        rows.append({"version": v, "kind": "anchor" if v == 0 else "delta", "publish_blocking_s": round(blocking, 3),
                     "snapshot_s": round(d["snapshot_s"], 3), "encode_s": round(d["encode_s"], 3),
                     "digest_s": round(d["digest_s"], 3), "upload_s": round(d["upload_s"], 3),
                     "bytes": d.get("part_bytes", d.get("bytes")), "changed": d["changed"], "elements": d["total"],
                     "rss_before_mb": round(before_kb / 1024), "peak_mb": round(peak_kb / 1024),
                     "sync_peak_mb": round((peak_kb - base_kb) / 1024)})
        print(f"[{args.mode} rank {rank}/{world}] v{v}: " + ", ".join(f"{k}={x}" for k, x in rows[-1].items()),
              flush=True)
    pub.close()
    out = {"mode": args.mode, "rank": rank, "world": world, "params_rss_mb": round(base_kb / 1024),
           "elements": sum(r["elements"] for r in rows[:1]), "versions": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{args.mode}-{world}-r{rank}.json").write_text(json.dumps(out, indent=1))
    if sharded:
        import torch.distributed as dist

        dist.destroy_process_group()


def restore_worker(args) -> None:
    """One rank of a restart: rebuild this rank's rows of the bucket's latest version, measured."""
    import gc

    import torch

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    from shared.bucket import open_bucket

    bucket = open_bucket(args.bucket)
    read = [0]
    original = bucket.download

    def download(path, local):  # count what this rank reads from the bucket
        out = original(path, local)
        read[0] += Path(local).stat().st_size
        return out

    bucket.download = download
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    import shared.follower  # imported before the baseline: module code is not the restore's memory
    import shared.sharded  # noqa: F401 -- likewise

    gc.collect()
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if args.how == "publisher":
        from shared.sharded import ShardedPublisher

        pub = ShardedPublisher(bucket, run_id="bench", take_over=True, lease_settle_s=0.0,
                               spool_dir=Path(args.spool) / f"restore-r{rank}")
        rows = pub.restored_rows()
        restored = rows is not None
    else:
        from shared.follower import Follower
        from shared.parts import rows_of

        _, full = Follower(bucket, cache_dir=Path(args.spool) / f"mat-r{rank}", download_workers=1).materialize()
        rows = {}
        for n, t in full.items():
            r0, r1 = rows_of(tuple(t.shape), rank, world)
            rows[n] = t[r0:r1].clone()
        del full
        restored = True
    elapsed = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    out = {"how": args.how, "rank": rank, "world": world, "restored": restored, "restore_s": round(elapsed, 2),
           "bytes_read": read[0], "rows_mb": round(sum(t.numel() * 2 for t in (rows or {}).values()) / 2**20),
           "peak_added_mb": round((peak_kb - base_kb) / 1024)}
    print(f"[restore {args.how} rank {rank}/{world}] " + ", ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    if args.how == "publisher":
        pub.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"restore-{args.how}-{world}-r{rank}.json").write_text(json.dumps(out))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _launch(script_args: list[str], n: int, sharded: bool) -> None:
    py = sys.executable
    if sharded:
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + os.getpid() % 1000), __file__, *script_args]
    else:
        cmd = [py, __file__, *script_args]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def restart_bench(args) -> dict:
    """Histories written by one process and by 2 ranks, restored by fresh processes (see the module docstring)."""
    results = {"model": "tiny" if args.quick else "Qwen3-0.6B-shaped", "density": args.density, "versions": 2,
               "host": f"{os.cpu_count()} CPUs", "histories": {}, "restores": {}}
    tmp = Path(tempfile.mkdtemp(prefix="dws-bench-restart-"))
    quick = ["--quick"] if args.quick else []
    try:
        for hist, mode, n in (("single-process", "single", 1), ("2 ranks", "sharded", 2)):
            b = tmp / mode
            _launch(["--worker", mode, "--bucket", str(b), "--spool", str(tmp / "spool"), "--out", str(tmp / "pub"),
                     "--versions", "2", "--density", str(args.density), *quick], n, mode == "sharded")
            results["histories"][hist] = {"bytes": sum(p.stat().st_size for p in b.rglob("*.safetensors"))}
        scenarios = [("2 ranks, own part (same partition)", "sharded", "publisher", 2),
                     ("2 ranks, re-split of the single-process history", "single", "publisher", 2),
                     ("1 rank, re-split of the 2-part history", "sharded", "publisher", 1),
                     ("2 ranks, whole-model rebuild then slice (no re-split)", "sharded", "materialize", 2)]
        for name, hist, how, n in scenarios:
            out = tmp / "restore" / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
            print(f"== restart: {name}", flush=True)
            _launch(["--restore", how, "--bucket", str(tmp / hist), "--spool", str(tmp / "spool"), "--out",
                     str(out), *quick], n, n > 1)
            runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
            results["restores"][name] = {
                "restored": all(r["restored"] for r in runs), "ranks": n,
                "restore_s_per_rank_max": max(r["restore_s"] for r in runs),
                "bytes_read_per_rank_max": max(r["bytes_read"] for r in runs),
                "peak_added_mb_per_rank_max": max(r["peak_added_mb"] for r in runs),
                "rows_mb_per_rank": max(r["rows_mb"] for r in runs), "runs": runs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _summary(runs: list[dict]) -> dict:
    deltas = [v for r in runs for v in r["versions"] if v["kind"] == "delta"]
    anchors = [v for r in runs for v in r["versions"] if v["kind"] == "anchor"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "ranks": runs[0]["world"] if runs[0]["mode"] == "sharded" else 1,
        "elements_per_rank": max(r["elements"] for r in runs),
        "params_rss_mb_per_rank": max(r["params_rss_mb"] for r in runs),
        "sync_peak_mb_per_rank": max(v["sync_peak_mb"] for r in runs for v in r["versions"]),
        "sync_peak_mb_per_rank_deltas": max(v["sync_peak_mb"] for v in deltas),
        "sync_peak_mb_per_rank_anchor": max(v["sync_peak_mb"] for v in anchors),
        "encode_s_per_rank_delta_median": med([v["encode_s"] for v in deltas]),
        "digest_s_per_rank_delta_median": med([v["digest_s"] for v in deltas]),
        "digest_s_per_rank_first": max(v["digest_s"] for v in anchors),
        "snapshot_s_per_rank_median": med([v["snapshot_s"] for r in runs for v in r["versions"]]),
        "upload_s_per_rank_delta_median": med([v["upload_s"] for v in deltas]),
        "delta_bytes_per_rank_median": med([v["bytes"] for v in deltas]),
        "anchor_bytes_per_rank": max(v["bytes"] for v in anchors),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--versions", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.065)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument("--single", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the single-process Publisher")
    ap.add_argument("--output", default=str(REPO / "bench" / "sharded.json"))
    ap.add_argument("--restart", action="store_true",
                    help="measure restarts instead (rebuilding each rank's rows; bench/sharded-restart.json)")
    ap.add_argument("--worker", choices=["single", "sharded"], dest="mode", help=argparse.SUPPRESS)
    ap.add_argument("--restore", choices=["publisher", "materialize"], dest="how", help=argparse.SUPPRESS)
    ap.add_argument("--bucket", help=argparse.SUPPRESS)
    ap.add_argument("--spool", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        worker(args)
        return 0
    if args.how:
        restore_worker(args)
        return 0
    if args.restart:
        res = restart_bench(args)
        out = Path(args.output) if args.output != str(REPO / "bench" / "sharded.json") \
            else REPO / "bench" / "sharded-restart.json"
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps({k: {x: y for x, y in v.items() if x != "runs"} for k, v in res["restores"].items()},
                         indent=1))
        return 0
    py = sys.executable
    configs = ([("single", 1)] if args.single else []) + [("sharded", n) for n in args.ranks]
    results = {"model": "tiny" if args.quick else "Qwen3-0.6B-shaped", "density": args.density,
               "versions": args.versions, "host": f"{os.cpu_count()} CPUs", "configs": {}}
    for mode, n in configs:
        tmp = Path(tempfile.mkdtemp(prefix="dws-bench-sharded-"))
        try:
            common = ["--worker", mode, "--bucket", str(tmp / "bucket"), "--spool", str(tmp / "spool"), "--out",
                      str(tmp / "out"), "--versions", str(args.versions), "--density", str(args.density)]
            common += ["--quick"] if args.quick else []
            if mode == "single":
                cmd = [py, __file__, *common]
            else:
                cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                       str(29500 + os.getpid() % 1000), __file__, *common]
            print(f"== {mode} x{n}: {' '.join(cmd[:6])} ...", flush=True)
            subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            runs = [json.loads(p.read_text()) for p in sorted((tmp / "out").glob("*.json"))]
            key = "single-process Publisher" if mode == "single" else f"ShardedPublisher x{n}"
            results["configs"][key] = {"summary": _summary(runs), "runs": runs}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    single = results["configs"].get("single-process Publisher")
    two = results["configs"].get("ShardedPublisher x2")
    if single and two:
        s, t = single["summary"], two["summary"]
        results["ratio_sync_peak_2_ranks_vs_single"] = round(t["sync_peak_mb_per_rank"] / s["sync_peak_mb_per_rank"], 3)
        results["ratio_encode_2_ranks_vs_single"] = round(
            t["encode_s_per_rank_delta_median"] / max(s["encode_s_per_rank_delta_median"], 1e-9), 3)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v["summary"] for k, v in results["configs"].items()}, indent=1))
    for k in ("ratio_sync_peak_2_ranks_vs_single", "ratio_encode_2_ranks_vs_single"):
        if k in results:
            print(f"{k}: {results[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
