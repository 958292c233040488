"""`make bench`: what the project exists for, measured side by side on realistic deltas.

Deltas come from real training: a model initialised like trained weights (std 0.02), fp32 master weights, AdamW, real
forward/backward passes on synthetic token batches; the bf16 casts of consecutive publishes give the deltas. Full
mode uses Qwen3-0.6B's real shape (28 layers, hidden 1024, 16/8 heads, intermediate 3072, vocab 151936, tied);
`--quick` uses the tiny model so CI can check this code does not rot (no speed assertion anywhere).

For every delta, one run, same data: payload of full bf16 safetensors, TRL's raw layout, raw + zstd, our compact
encoding, and the entropy floor (iid positions at each tensor's density + order-0 residual entropy); bit-exactness of
compact after decoding. Timings (medians over repeats, with min/max): one full-model `torch.ne` pass (the memory
bandwidth floor), our change detection + encode, decode. Where CUDA is available the detection also runs on the GPU.
Results go to a JSON file and a PNG; a table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.follower import apply_to_state  # noqa: E402
from shared.formats import TensorChange, bits, encode_delta, read_patch_file  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096)
FULL_SCENARIOS = [("lr3e-6", 3e-6, 1, 4), ("lr1e-5", 1e-5, 1, 3), ("lr1e-6", 1e-6, 1, 3), ("lr3e-6-gap4", 3e-6, 4, 2)]
QUICK_SCENARIOS = [("lr3e-6", 3e-6, 1, 3), ("lr1e-5", 1e-5, 1, 2), ("lr3e-6-gap4", 3e-6, 4, 2)]
FORMATS = ("full_bf16", "trl_raw", "raw_zstd", "compact", "entropy_floor")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(quick: bool, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dws_tools.tiny_model import DEFAULT_CONFIG

    cfg = Qwen3Config(**(DEFAULT_CONFIG if quick else QWEN3_06B), tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.float(), cfg


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to(torch.bfloat16).clone() for n, p in model.named_parameters()}


def h2(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def diff(prev, cur) -> dict[str, TensorChange]:
    out = {}
    for name, c in cur.items():
        cb, pb = bits(c).reshape(-1), bits(prev[name]).reshape(-1)
        pos = np.flatnonzero(cb != pb)
        if pos.size:
            out[name] = TensorChange(tuple(c.shape), pos, cb[pos], pb[pos])
    return out


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": repeats}


def measure_delta(prev, cur, *, version: int, repeats: int, tmp: Path) -> dict:
    total = sum(t.numel() for t in cur.values())
    changes = diff(prev, cur)
    changed = sum(c.positions.size for c in changes.values())
    header = json.dumps({n: {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [0, 0]} for n, t in cur.items()})
    raw = encode_delta(changes, version=version, base=version - 1, total=total, encoding="raw")
    compact = encode_delta(changes, version=version, base=version - 1, total=total, encoding="compact")
    pos_bits = sum(int(np.prod(c.shape)) * h2(c.positions.size / int(np.prod(c.shape))) for c in changes.values())
    res = np.concatenate([(c.new_bits - c.base_bits).view(np.int16) for c in changes.values()]) if changes else []
    _, counts = np.unique(res, return_counts=True)
    p = counts / max(counts.sum(), 1)
    res_bits = float(-(p * np.log2(p)).sum()) * len(res)
    sizes = {"full_bf16": 8 + len(header) + 2 * total, "trl_raw": len(raw),
             "raw_zstd": len(zstandard.ZstdCompressor(level=3).compress(raw)), "compact": len(compact),
             "entropy_floor": int((pos_bits + res_bits) / 8)}
    # Bit-exactness of what a replica decodes.
    path = tmp / f"d{version}.safetensors"
    path.write_bytes(compact)
    state = {k: v.clone() for k, v in prev.items()}
    apply_to_state(state, read_patch_file(path))
    exact = all(torch.equal(state[k].view(torch.int16), cur[k].view(torch.int16)) for k in cur)

    def ne_pass():
        for name, c in cur.items():
            torch.ne(c.view(torch.int16), prev[name].view(torch.int16))

    def detect_encode():
        ch = {}
        for name, c in cur.items():
            cb, pb = c.view(torch.int16).reshape(-1), prev[name].view(torch.int16).reshape(-1)
            pos = torch.ne(cb, pb).nonzero().squeeze(1)
            if pos.numel():
                pn = pos.numpy()
                ch[name] = TensorChange(tuple(c.shape), pn, cb.numpy().view(np.uint16)[pn], pb.numpy().view(np.uint16)[pn])
        encode_delta(ch, version=version, base=version - 1, total=total, encoding="compact")

    def decode():
        pf = read_patch_file(path)
        for name, d in pf.tensors.items():
            d.resolve(bits(prev[name]).reshape(-1)[d.positions])

    return {
        "version": version, "changed": int(changed), "total": int(total), "density": changed / total,
        "bytes": sizes, "bytes_per_changed": {k: (v / changed if changed else None) for k, v in sizes.items()},
        "bit_exact": bool(exact),
        "time": {"ne_pass": timed(ne_pass, repeats), "detect_encode": timed(detect_encode, repeats),
                 "decode": timed(decode, repeats)},
    }


def gpu_rows(prev, cur, repeats: int) -> dict:
    if not torch.cuda.is_available():
        return {"available": False, "note": "no GPU"}
    dev = torch.device("cuda")
    p = {k: v.to(dev) for k, v in prev.items()}
    c = {k: v.to(dev) for k, v in cur.items()}

    def sync(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return run

    def ne_pass():
        for name in c:
            torch.ne(c[name].view(torch.int16), p[name].view(torch.int16))

    def detect_to_host():
        flat_c = [c[n].view(torch.int16).reshape(-1) for n in c]
        flat_p = [p[n].view(torch.int16).reshape(-1) for n in c]
        out = []
        for a, b in zip(flat_c, flat_p):
            pos = torch.ne(a, b).nonzero().squeeze(1)
            out.append((pos.cpu(), a[pos].cpu(), b[pos].cpu()))
        return out

    def detect_encode():
        total = sum(t.numel() for t in c.values())
        ch = {}
        for name, (pos, nv, ov) in zip(c, detect_to_host()):
            if pos.numel():
                ch[name] = TensorChange(tuple(c[name].shape), pos.numpy(), nv.numpy().view(np.uint16),
                                        ov.numpy().view(np.uint16))
        encode_delta(ch, version=1, base=0, total=total, encoding="compact")

    return {"available": True, "device": torch.cuda.get_device_name(0),
            "ne_pass": timed(sync(ne_pass), repeats), "detect_to_host": timed(sync(detect_to_host), repeats),
            "detect_encode": timed(sync(detect_encode), repeats)}


def run(args) -> dict:
    scenarios = QUICK_SCENARIOS if args.quick else FULL_SCENARIOS
    model, cfg = build_model(args.quick, args.seed)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {'tiny' if args.quick else 'Qwen3-0.6B-shaped'}, {n_params:,} parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="dws-bench-"))
    gen = torch.Generator().manual_seed(args.seed)
    gpu = None
    for name, lr, gap, n_deltas in scenarios:
        model.load_state_dict(base_state)
        # foreach=False: the fused multi-tensor path holds temporaries the size of the model (0.6B: +2.4 GB).
        opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
        prev = snapshot(model)
        deltas = []
        for i in range(n_deltas):
            for _ in range(gap):
                ids = torch.randint(0, min(cfg.vocab_size, 32000), (args.batch, args.seq), generator=gen)
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step_s = time.perf_counter() - t0
            cur = snapshot(model)
            d = measure_delta(prev, cur, version=i + 1, repeats=args.repeats, tmp=tmp)
            d["train_step_s"] = step_s
            deltas.append(d)
            log(f"{name} delta {i + 1}/{n_deltas}: {d['density'] * 100:.3f}% changed, compact "
                f"{d['bytes_per_changed']['compact']:.3f} B/changed, raw {d['bytes_per_changed']['trl_raw']:.2f}, "
                f"bit-exact {d['bit_exact']}")
            if gpu is None and name == scenarios[0][0] and i == n_deltas - 1:
                gpu = gpu_rows(prev, cur, args.repeats)
            prev = cur
        results.append({"scenario": name, "lr": lr, "publish_every": gap, "deltas": deltas})
    return {
        "date": dt.date.today().isoformat(),
        "mode": "quick" if args.quick else "full",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": {"parameters": n_params, "shape": "tiny" if args.quick else "Qwen3-0.6B"},
        "batch": [args.batch, args.seq],
        "scenarios": results,
        "gpu": gpu,
    }


def summarize(res: dict) -> list[dict]:
    rows = []
    for sc in res["scenarios"]:
        ds = sc["deltas"]
        med = lambda f: statistics.median(f(d) for d in ds)  # noqa: E731
        rows.append({
            "scenario": sc["scenario"], "density_pct": 100 * med(lambda d: d["density"]),
            **{f"bpce_{k}": med(lambda d, k=k: d["bytes_per_changed"][k] or 0) for k in FORMATS},
            "compact_vs_full": med(lambda d: d["bytes"]["full_bf16"] / d["bytes"]["compact"]),
            "encode_over_ne": med(lambda d: d["time"]["detect_encode"]["median_s"] / d["time"]["ne_pass"]["median_s"]),
            "ne_ms": 1e3 * med(lambda d: d["time"]["ne_pass"]["median_s"]),
            "encode_ms": 1e3 * med(lambda d: d["time"]["detect_encode"]["median_s"]),
            "decode_ms": 1e3 * med(lambda d: d["time"]["decode"]["median_s"]),
            "bit_exact": all(d["bit_exact"] for d in ds),
        })
    return rows


def table(rows: list[dict], gpu: dict | None) -> str:
    head = ("| scenario | changed % | full bf16 | TRL raw | raw+zstd | **compact** | entropy floor | compact vs full |"
            " detect+encode / torch.ne | ne ms | encode ms | decode ms | bit-exact |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['density_pct']:.3f} | {r['bpce_full_bf16']:.0f} | {r['bpce_trl_raw']:.2f} |"
                     f" {r['bpce_raw_zstd']:.2f} | **{r['bpce_compact']:.3f}** | {r['bpce_entropy_floor']:.3f} |"
                     f" {r['compact_vs_full']:.0f}x | {r['encode_over_ne']:.1f}x | {r['ne_ms']:.1f} | {r['encode_ms']:.1f} |"
                     f" {r['decode_ms']:.1f} | {'yes' if r['bit_exact'] else 'NO'} |")
    lines.append("")
    lines.append("(sizes in bytes per changed element; times are medians over repeats on this machine's CPU)")
    if gpu and gpu.get("available"):
        lines.append(f"GPU ({gpu['device']}): torch.ne pass {gpu['ne_pass']['median_s'] * 1e3:.2f} ms, detect + copy to "
                     f"host {gpu['detect_to_host']['median_s'] * 1e3:.2f} ms, detect + encode "
                     f"{gpu['detect_encode']['median_s'] * 1e3:.2f} ms")
    else:
        lines.append("GPU rows: no GPU")
    return "\n".join(lines)


def plot(res: dict, rows: list[dict], out: Path) -> None:
    """Left: bytes per version by format. Right (when bench/replica.py has run): inference pause by apply path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replicas = [json.loads(p.read_text()) for p in sorted(out.parent.glob("replica-*.json"))]
    fig, axes = plt.subplots(1, 2 if replicas else 1, figsize=(14 if replicas else 9, 4.5),
                             gridspec_kw={"width_ratios": [3, 2]} if replicas else None, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(FORMATS)
    x = np.arange(len(rows))
    for i, f in enumerate(FORMATS):
        vals = [statistics.median(d["bytes"][f] for d in sc["deltas"]) for sc in res["scenarios"]]
        ax.bar(x + i * width, vals, width, label=f.replace("_", " "))
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(FORMATS) - 1) / 2, [r["scenario"] for r in rows])
    ax.set_ylabel("bytes per version (median, log)")
    ax.set_title(f"payload by format — {res['model']['shape']} ({res['model']['parameters']:,} params)", fontsize=10)
    ax.legend(fontsize=8)
    if replicas:
        ax = axes[0][1]
        labels = [f"{r['apply_mode']}\nverify {r.get('verify', 'every')}" for r in replicas]
        xr = np.arange(len(replicas))
        ax.bar(xr - 0.2, [1e3 * r["anchor"]["pause_s"] for r in replicas], 0.4, label="anchor (full reload)")
        ax.bar(xr + 0.2, [1e3 * r["delta_median"]["pause_s"] for r in replicas], 0.4, label="delta (median)")
        ax.set_xticks(xr, labels, fontsize=8)
        ax.set_ylabel("inference pause per sync (ms)")
        ax.set_title(f"pause by path — vLLM CPU, {replicas[0]['parameters'] / 1e6:.1f} M params", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model (CI smoke run); the full run is manual")
    ap.add_argument("--out", default="bench/results.json")
    ap.add_argument("--plot", default="bench/results.png")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's results, run nothing")
    args = ap.parse_args(argv)
    if args.plot_only:
        res = json.loads(Path(args.out).read_text())
        plot(res, res["summary"], Path(args.plot))
        return 0
    res = run(args)
    rows = summarize(res)
    res["summary"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, rows, Path(args.plot))
    print(table(rows, res["gpu"]))
    print(f"\nresults: {out}" + (f", plot: {args.plot}" if args.plot else ""))
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
