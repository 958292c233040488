"""`make bench` (replica half): what a sync costs a real vLLM replica, measured through the production gateway.

For each model size (default: the 41.6 M-parameter model and a Qwen3-0.6B-shaped one, random weights built locally,
side by side in one run) one replica (`python -m rollout_space`, vLLM on CPU) starts from a base model that is
*not* in the bucket while the bucket's latest version is an anchor: its first sync is a full-weight reload (the
"full-reload pause"; after the deltas, `--reloads` - 1 more anchors that no delta leads to give more samples, and the
median is reported: one sample swung 0.29-1.39 s at 0.6B across runs). Then every following version is a real AdamW
step (fp32 master weights, lr 3e-6) published as a sparse delta. Per sync, from the replica's own /status record:

* control plane -- pause_s minus the worker's apply time (pause + one dws_apply RPC + resume round trips);
* apply -- the worker's validate + write + read-back of the changed positions (in-pause verification included);
* after-resume verify -- the worker time of the chunked full digest, and the window from resume to its verdict;
* publish -> serving (resume) and publish -> verified, local-folder bucket, 0.05 s polling. The versions are
  trained and encoded first (the trainer is then freed: at 0.6B its fp32 weights + AdamW state are ~10 GB), and
  "publish" is the commit of an already-encoded version (files, then manifest), so this is the replica's latency,
  not the trainer's encode time (bench/run.py measures that);
* peak RSS change -- per process of the gateway's tree (gateway + vLLM API server + engine core), the peak resident
  memory during the sync (kernel VmHWM, reset before each sync through /proc/PID/clear_refs) minus the resident
  memory just before it; summed over processes, so an upper bound.

A sync that failed on the way (e.g. a delta the worker rejected, recovered from the anchor) stops the benchmark
with the replica's reason: it would otherwise be measured as a slow success. `--encoding ctx` runs the replica on
base-context deltas (the worker decodes them against its weights; files get a -ctx suffix); `--work-dir` keeps the
models, bucket and logs.

Run it in the rollout venv: `.venv/rollout/bin/python bench/replica.py [--sizes small,0.6b] [--deltas 5]`; it
writes bench/replica-<size>.json.
"""

from __future__ import annotations

import argparse
import contextlib
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

from dws_testing import free_port  # noqa: E402
from dws_tools.tiny_model import build_tiny_model  # noqa: E402
from shared.publisher import Publisher  # noqa: E402

SIZES = {
    "tiny": {},
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000),
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=2048),
}


class Trainer:
    """fp32 master weights + AdamW (foreach=False: the multi-tensor path holds model-sized temporaries) with real
    forward/backward passes on random token batches."""

    def __init__(self, model_dir: Path, *, lr: float, seed: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, foreach=False)
        self.gen = torch.Generator().manual_seed(seed)

    def step(self) -> None:
        ids = self.torch.randint(0, 256, (2, 24), generator=self.gen)
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def params(self):
        return dict(self.model.named_parameters())


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            children = []
        for c in children:
            if c not in pids:
                pids.append(c)
                frontier.append(c)
    return pids


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakRss:
    """Per-process peak resident memory over an interval (VmHWM after a clear_refs reset)."""

    def __init__(self, root: int) -> None:
        self.pids = tree(root)
        self.before = {}

    def start(self) -> None:
        for p in self.pids:
            try:
                Path(f"/proc/{p}/clear_refs").write_text("5")  # 5: reset the peak-RSS counter (own processes)
            except OSError:
                pass
            self.before[p] = _status_kb(p, "VmRSS")

    def stop(self) -> dict:
        rise = {p: max(0, _status_kb(p, "VmHWM") - self.before.get(p, 0)) for p in self.pids}
        return {"total_mb": sum(rise.values()) / 1024, "max_process_mb": max(rise.values()) / 1024,
                "rss_mb": sum(self.before.values()) / 1024,
                "by_process_mb": {f"{p} {_comm(p)}": round(r / 1024, 1) for p, r in rise.items()}}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def encode_reloads(work: Path, *, first: int, count: int) -> list[tuple[Path, bytes]]:
    """Extra full-reload samples (the full reload swung 0.29-1.39 s across runs at 0.6B, one sample each): versions
    `first`, `first` + 1, ... each published alone, as an anchor, in its own staging bucket, with weights that
    alternate between the two base models -- no delta leads to them, so the replica must reload everything."""
    from safetensors.torch import load_file

    from shared.manifest import MANIFEST_PATH

    out = []
    for k in range(count):
        folder = work / ("other-base" if k % 2 == 0 else "model")
        weights = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(load_file(f))
        staging = work / f"staging-reload-{k}"
        with Publisher(staging, anchor_every=1000, anchor_fraction=1000.0) as pub:
            pub.publish(weights, first + k)
            pub.flush()
        out.append((staging, (staging / MANIFEST_PATH).read_bytes()))
        del weights
    return out


def train_and_encode(size: str, *, deltas: int, lr: float, work: Path,
                     encoding: str = "compact") -> tuple[int, list[bytes]]:
    """Phase 1: the trainer's AdamW steps, published (encoded, committed) into a staging bucket; after each commit
    the manifest is kept. The trainer is then freed before vLLM starts, so the machine never holds the trainer's fp32
    weights + optimizer state *and* the served model at once (at 0.6B: ~10 GB + ~4 GB)."""
    import gc

    from shared.manifest import MANIFEST_PATH

    over = SIZES[size]
    print(f"[replica bench] {size}: building models, training {deltas} AdamW steps", flush=True)
    trained = build_tiny_model(work / "model", seed=0, **over)
    build_tiny_model(work / "other-base", seed=1, **over)  # not any bucket version: forces a full reload
    trainer = Trainer(trained, lr=lr)
    n_params = sum(p.numel() for p in trainer.params().values())
    staging = work / "staging"
    manifests = []
    with Publisher(staging, anchor_every=1000, anchor_fraction=1000.0, encoding=encoding) as pub:
        for v in range(deltas + 1):
            if v:
                trainer.step()
            pub.publish(trainer.params(), v)
            pub.flush()
            manifests.append((staging / MANIFEST_PATH).read_bytes())
    del trainer, pub
    gc.collect()
    return n_params, manifests


def commit(staging: Path, bucket: Path, manifest: bytes) -> None:
    """Phase 2 'publish': the version's files appear in the live bucket, then its manifest (the commit point)."""
    import shutil

    from shared.manifest import MANIFEST_PATH

    for f in staging.rglob("*.safetensors"):
        dest = bucket / f.relative_to(staging)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    tmp = bucket / (MANIFEST_PATH + ".tmp")
    tmp.write_bytes(manifest)
    tmp.replace(bucket / MANIFEST_PATH)


def run_size(size: str, *, deltas: int, lr: float, work: Path, reloads: int = 3, encoding: str = "compact") -> dict:
    n_params, manifests = train_and_encode(size, deltas=deltas, lr=lr, work=work, encoding=encoding)
    extra = encode_reloads(work, first=deltas + 1, count=max(0, reloads - 1))
    other = work / "other-base"
    bucket = work / "bucket"
    bucket.mkdir()
    commit(work / "staging", bucket, manifests[0])
    port = free_port()
    env = dict(os.environ, DWS_API_KEY="bench", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "rollout_space", "--model", str(other), "--bucket", str(bucket), "--host",
           "127.0.0.1", "--port", str(port), "--poll-interval", "0.05", "--max-model-len", "512", "--no-ui",
           "--vllm-args=--enforce-eager", "--vllm-log", str(work / "vllm.log"), "--cache-dir", str(work / "cache")]
    proc = subprocess.Popen(cmd, env=env, stdout=open(work / "gateway.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    def status():
        return http.get("/status").json()

    def wait_for(v, timeout=900):
        """(seconds until served_version == v, seconds until that sync's record is complete, status)."""
        t0, t_serving = time.perf_counter(), None
        while time.perf_counter() - t0 < timeout:
            try:
                st = status()
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if st["served_version"] == v and t_serving is None:
                t_serving = time.perf_counter() - t0
            if st["served_version"] == v and not st["syncing"]:
                return t_serving, time.perf_counter() - t0, st
            if proc.poll() is not None:
                raise SystemExit(f"replica exited; see {work}/gateway.log")
            time.sleep(0.05)
        raise SystemExit(f"replica never reached v{v}; see {work}/gateway.log")

    try:
        _, _, st = wait_for(0, timeout=1800)
        anchor = st["last_sync"]
        assert anchor["verified"] is True, anchor
        rss = PeakRss(proc.pid)
        print(f"[replica bench] {size}: {n_params:,} params; full reload: pause {anchor['pause_s'] * 1e3:.1f} ms, "
              f"{anchor['bytes']:,} B", flush=True)
        rows = []
        for v in range(1, deltas + 1):
            rss.start()
            t0 = time.perf_counter()
            commit(work / "staging", bucket, manifests[v])
            publish_s = time.perf_counter() - t0
            serving_s, verified_s, st = wait_for(v)
            peak = rss.stop()
            last = st["last_sync"]
            assert last["ok"] and last["verified"] is True and st["digest_match"] is True, last
            # A delta that failed and was recovered from the anchor would be measured as a (slow) success:
            # any failed round is an error of the benchmark, with the replica's own reason.
            failed = [r for r in st["recent_syncs"] if not r["ok"]]
            if st["failures"] or failed:
                raise SystemExit(f"replica bench: {st['failures']} failed sync(s) on the way to v{v}: "
                                 f"{[(r['plan'], r['error']) for r in failed]}")
            rows.append({"version": v, "changed": last["changed"], "bytes": last["bytes"],
                         "before_pause_s": last["download_s"], "decode_s": last["decode_s"],
                         "worker_prepare_s": last["prepare_s"],
                         "pause_s": last["pause_s"], "control_s": last["control_s"],
                         "apply_s": last["worker_apply_s"], "verify_after_resume_s": last["verify_s"],
                         "verify_window_s": last["verify_window_s"], "publish_s": publish_s,
                         "publish_to_serving_s": serving_s, "publish_to_verified_s": verified_s,
                         "peak_rss_rise_mb": peak["total_mb"], "peak_rss_rise_max_process_mb": peak["max_process_mb"],
                         "peak_rss_rise_by_process_mb": peak["by_process_mb"]})
            r = rows[-1]
            print(f"[replica bench] {size} v{v} ({last['plan']}): {r['changed']:,} changed, pause {r['pause_s'] * 1e3:.1f} ms "
                  f"(control {r['control_s'] * 1e3:.1f}, apply+read-back {r['apply_s'] * 1e3:.1f}), verify after "
                  f"resume {r['verify_after_resume_s'] * 1e3:.0f} ms, publish->serving "
                  f"{r['publish_to_serving_s'] * 1e3:.0f} ms, peak RSS +{r['peak_rss_rise_mb']:.0f} MB "
                  f"{ {k: v for k, v in r['peak_rss_rise_by_process_mb'].items() if v} }", flush=True)
        reload_pauses = [anchor["pause_s"]]
        for k, (staging, manifest) in enumerate(extra):
            commit(staging, bucket, manifest)
            _, _, st = wait_for(deltas + 1 + k)
            last = st["last_sync"]
            assert last["ok"] and last["verified"] is True and ": anchor v" in last["plan"], last
            reload_pauses.append(last["pause_s"])
            print(f"[replica bench] {size}: full reload {k + 2}: pause {last['pause_s'] * 1e3:.1f} ms", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("version", "peak_rss_rise_by_process_mb")}
    reload_s = statistics.median(reload_pauses)  # the first full reload and the extra anchors
    model_mb = n_params * 2 / 2**20
    return {
        "size": size, "parameters": n_params, "model_mb": model_mb, "lr": lr, "verify": "every", "encoding": encoding,
        "apply_mode": f"mapped, {size}" + ("" if encoding == "compact" else f", {encoding}"),  # label of bench/run.py's pause plot
        "anchor": {"pause_s": reload_s},  # the full reload, under the key bench/run.py plots
        "full_reload": {"pause_s": reload_s, "pause_samples_s": reload_pauses,
                        "first_apply_s": anchor["worker_apply_s"], "bytes": anchor["bytes"],
                        "first_verify_after_resume_s": anchor["verify_s"]},
        "delta_median": med,
        "delta_pause_over_full_reload_pause": med["pause_s"] / reload_s,
        "pause_us_per_1k_changed": med["pause_s"] * 1e6 / (med["changed"] / 1e3),
        "max_peak_rss_rise_over_model_bytes": max(r["peak_rss_rise_mb"] for r in rows) / model_mb,
        "deltas": rows,
    }


def table(results: list[dict]) -> str:
    lines = ["| per sync (median) | " + " | ".join(f"{r['size']} ({r['parameters'] / 1e6:.1f} M)" for r in results) + " |",
             "|---|" + "---|" * len(results)]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")

    ms = lambda x: f"{x * 1e3:.1f}"  # noqa: E731
    row("changed elements", lambda r: f"{r['delta_median']['changed']:,.0f}")
    row("delta bytes", lambda r: f"{r['delta_median']['bytes']:,.0f}")
    row("before the pause: download + sha256 + decode + prepare, ms", lambda r: ms(r['delta_median']['before_pause_s']))
    row("of which the worker's plan (dws_prepare, between engine steps), ms",
        lambda r: ms(r['delta_median']['worker_prepare_s']))
    row("**delta pause**, ms", lambda r: ms(r['delta_median']['pause_s']))
    row("of which control plane (pause + 1 RPC + resume), ms", lambda r: ms(r['delta_median']['control_s']))
    row("of which apply + in-pause read-back, ms", lambda r: ms(r['delta_median']['apply_s']))
    row("after-resume full digest (worker), ms", lambda r: ms(r['delta_median']['verify_after_resume_s']))
    row("wrong-weight window (resume -> verdict), ms", lambda r: ms(r['delta_median']['verify_window_s']))
    row("full-reload pause (median of the samples), ms", lambda r: f"{ms(r['full_reload']['pause_s'])} "
        f"({len(r['full_reload']['pause_samples_s'])})")
    row("delta pause / full-reload pause", lambda r: f"{r['delta_pause_over_full_reload_pause']:.3f}")
    row("pause per 1 k changed elements, µs", lambda r: f"{r['pause_us_per_1k_changed']:.1f}")
    row("publish -> serving, ms", lambda r: ms(r['delta_median']['publish_to_serving_s']))
    row("publish -> verified, ms", lambda r: ms(r['delta_median']['publish_to_verified_s']))
    row("peak RSS rise, worst sync, MB (% of model bytes)",
        lambda r: f"{max(d['peak_rss_rise_mb'] for d in r['deltas']):.0f} "
                  f"({100 * r['max_peak_rss_rise_over_model_bytes']:.1f} %)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/replica.py")
    ap.add_argument("--sizes", default="small,0.6b", help="comma-separated: " + ", ".join(SIZES))
    ap.add_argument("--deltas", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-6)
    ap.add_argument("--reloads", type=int, default=3, help="full-reload samples (median reported)")
    ap.add_argument("--encoding", default="compact", help="the deltas' encoding (ctx: the worker decodes against "
                    "its weights); output files get a -<encoding> suffix unless compact")
    ap.add_argument("--out-dir", default="bench", help="writes replica-<size>.json there")
    ap.add_argument("--work-dir", default=None, help="keep the models, bucket and logs (gateway.log, vllm.log) "
                    "in a new folder under this one instead of deleting them")
    args = ap.parse_args(argv)
    results = []
    for size in args.sizes.split(","):
        prefix = f"dws-bench-replica-{size}-"
        with (tempfile.TemporaryDirectory(prefix=prefix) if args.work_dir is None
              else contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix, dir=args.work_dir))) as work:
            results.append(run_size(size, deltas=args.deltas, lr=args.lr, work=Path(work), reloads=args.reloads,
                                    encoding=args.encoding))
    side = {"sizes": [r["size"] for r in results], "table": table(results)}
    if len(results) == 2:
        side["pause_per_changed_ratio"] = results[1]["pause_us_per_1k_changed"] / results[0]["pause_us_per_1k_changed"]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in results:  # one file per size (bench/run.py plots every bench/replica-*.json); same run, side by side
        r.update({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "side_by_side": side})
        suffix = "" if args.encoding == "compact" else f"-{args.encoding}"
        (out_dir / f"replica-{r['size']}{suffix}.json").write_text(json.dumps(r, indent=1))
    print("\n" + side["table"])
    if "pause_per_changed_ratio" in side:
        print(f"\npause per changed element, {results[1]['size']} / {results[0]['size']}: "
              f"{side['pause_per_changed_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
