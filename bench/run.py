"""`make bench`: what the project exists for, measured side by side on realistic deltas.

Deltas come from real training: a model initialised like trained weights (std 0.02), fp32 master weights, AdamW, real
forward/backward passes on synthetic token batches; the bf16 casts of consecutive publishes give the deltas. Full
mode uses Qwen3-0.6B's real shape (28 layers, hidden 1024, 16/8 heads, intermediate 3072, vocab 151936, tied);
`--quick` uses the tiny model so CI can check this code does not rot (no speed assertion anywhere). Scenarios: lr
1e-6, 3e-6, 1e-5 from the start, publish every 4 steps, and a warm run (20 AdamW steps before the first measured
delta, so Adam's normalised step has settled and densities fall toward RL's 1-3 %).

For every delta, one run, same data: payload of full bf16 safetensors, TRL's raw layout, raw + zstd, our compact
encoding (v1), ctx (v2, base-exponent context; the file keeps compact for tensors where that is smaller), the
order-0 floor (iid positions at each tensor's density + order-0 residual entropy) and the conditional floor that the
base-exponent context reaches (iid positions per tensor and exponent class + residual entropy per exponent class;
no table costs); bit-exactness of compact and ctx after applying through the Follower's `apply_to_state`; and how
often a residual's sign repeats the previous version's at the same position (the Adam-momentum context ctx does not
use: the estimate of what it would save is reported). Timings (medians over repeats, with min/max) on the last delta
of each scenario: one full-model `torch.ne` pass (the memory-bandwidth floor), change detection + encode for compact
and ctx, decode (+ resolve onto the base) for both, side by side in rounds (each ratio to `torch.ne` is the median
of the rounds' ratios). Where CUDA is available the detection also runs on the GPU.
Results go to a JSON file and a PNG; a table is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
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

from shared import formats  # noqa: E402
from shared.follower import apply_to_state  # noqa: E402
from shared.formats import TensorChange, bits, diff_state, encode_delta, read_patch_file  # noqa: E402

# --mid: the 4-layer, hidden-1024 transformer of issue 16's first measurements (~86 M parameters), for scenarios the
# 0.6B run cannot fit on a shared machine in time.
MID = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
           head_dim=128, vocab_size=32000, max_position_embeddings=4096)
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=4096)
# (name, lr, optimizer steps per publish, measured deltas, warm-up steps before the first measured delta)
# Sized for a 2-core, 24 GB machine: AdamW at 0.6B holds ~10 GB, and every measured delta costs minutes.
FULL_SCENARIOS = [("lr1e-6", 1e-6, 1, 1, 0), ("lr3e-6", 3e-6, 1, 2, 0), ("lr1e-5", 1e-5, 1, 1, 0),
                  ("lr3e-6-gap4", 3e-6, 4, 1, 0), ("warm-lr3e-6", 3e-6, 1, 2, 20)]
QUICK_SCENARIOS = [("lr3e-6", 3e-6, 1, 3, 0), ("lr1e-5", 1e-5, 1, 2, 0), ("lr3e-6-gap4", 3e-6, 4, 2, 0),
                   ("warm-lr3e-6", 3e-6, 1, 2, 3)]
FORMATS = ("full_bf16", "trl_raw", "raw_zstd", "compact", "ctx", "entropy_floor", "conditional_floor")
CODECS = ("compact", "ctx")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(quick: bool, seed: int, mid: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from dws_tools.tiny_model import DEFAULT_CONFIG

    cfg = Qwen3Config(**(DEFAULT_CONFIG if quick else MID if mid else QWEN3_06B), tie_word_embeddings=True)
    model = Qwen3ForCausalLM(cfg).float()
    init_weights(model, seed)
    return model, cfg


def init_weights(model, seed: int) -> None:
    """The same starting weights for every scenario, re-drawn rather than kept: a copy of the fp32 state would cost
    2.4 GB at 0.6B next to the weights, their gradients and AdamW's two moments."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


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
            out[name] = TensorChange(tuple(c.shape), pos, cb[pos], pb[pos], base=pb)
    return out


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _stats(times)


def timed_rounds(fns: dict, repeats: int, *, reference: str | tuple[str, ...], alternate: bool = False,
                 pairs: dict[str, str] | None = None) -> dict:
    """`timed` for several functions side by side: each round runs every one once, in order, and each gets, next to
    its own statistics, the median over rounds of its time over `reference`'s in the same round. This machine's speed
    drifts by tens of percent within a minute (its memory state: fresh pages cost 0.4-7 us each); a ratio of two
    medians taken minutes apart carried that drift, a per-round ratio cancels what lasts longer than a round.
    `alternate`: every other round runs them in reverse order, so that two functions compared with each other take
    turns going first and neither always inherits the other's memory state (two same-process comparisons of this
    round, the new code always first, put it 26 % behind in one and 16 % ahead in the next). `pairs` (name -> the
    name it is compared with) adds ``over_pair``: the median over rounds of its time over its partner's. Several
    `reference` names give an ``over_<name>`` for each."""
    refs = (reference,) if isinstance(reference, str) else tuple(reference)
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items())
        for name, fn in (order[::-1] if alternate and r % 2 else order):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    def over(name: str, other: str) -> float:
        return statistics.median(t / r for t, r in zip(times[name], times[other]))

    return {name: _stats(ts) | {f"over_{ref}": over(name, ref) for ref in refs}
            | ({"over_pair": over(name, pairs[name])} if name in (pairs or {}) else {})
            for name, ts in times.items()}


def _entropy_bits(values: np.ndarray) -> float:
    """n * order-0 entropy of `values`, in bits."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def floors(changes: dict[str, TensorChange]) -> tuple[float, float]:
    """(order-0 floor, exponent-conditional floor) in bits for one delta."""
    pos0 = posc = 0.0
    res, exps = [], []
    for ch in changes.values():
        numel = int(np.prod(ch.shape))
        pos0 += numel * h2(ch.positions.size / numel)
        e = (ch.base >> 7).astype(np.uint8)
        n_c = np.bincount(e, minlength=256)
        k_c = np.bincount(e[ch.positions], minlength=256)
        posc += sum(int(n) * h2(int(k) / int(n)) for n, k in zip(n_c, k_c) if k)
        res.append((ch.new_bits - ch.base_bits).view(np.int16))
        exps.append(e[ch.positions])
    if not res:
        return 0.0, 0.0
    r, e = np.concatenate(res), np.concatenate(exps)
    order = np.argsort(e, kind="stable")
    r, e = r[order], e[order]
    cuts = np.flatnonzero(np.diff(e)) + 1
    res_c = sum(_entropy_bits(part) for part in np.split(r, cuts))
    return pos0 + _entropy_bits(r), posc + res_c


def sign_repeat(prev_signs: dict | None, changes: dict[str, TensorChange]) -> tuple[dict, dict | None]:
    """Signs of this delta's residuals by position, and how often they repeat the previous delta's."""
    signs = {n: (ch.positions, (ch.new_bits - ch.base_bits).view(np.int16) < 0) for n, ch in changes.items()}
    if prev_signs is None:
        return signs, None
    both = same = 0
    for name, (pos, neg) in signs.items():
        if name not in prev_signs:
            continue
        ppos, pneg = prev_signs[name]
        common, i, j = np.intersect1d(pos, ppos, assume_unique=True, return_indices=True)
        both += common.size
        same += int((neg[i] == pneg[j]).sum())
    changed = sum(ch.positions.size for ch in changes.values())
    frac, p = both / max(changed, 1), same / max(both, 1)
    return signs, {"fraction_changed_again": frac, "p_same_sign": p,
                   "bits_saved_per_changed": frac * (1.0 - h2(p))}


def measure_delta(prev, cur, *, version: int, repeats: int, tmp: Path, timing: bool, prev_signs) -> tuple[dict, dict]:
    total = sum(t.numel() for t in cur.values())
    changes = diff(prev, cur)
    changed = sum(c.positions.size for c in changes.values())
    header = json.dumps({n: {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [0, 0]} for n, t in cur.items()})
    raw = encode_delta(changes, version=version, base=version - 1, total=total, encoding="raw")
    # Each codec's file as the publisher writes it: its own detection (ctx is encoded on the way, with per-class
    # Rice parameters from the detection's sample), then encode_delta.
    blobs = {name: encode_delta(diff_state(cur, prev, encoding=name), version=version, base=version - 1, total=total,
                                encoding=name) for name in CODECS}
    floor0, floor_ctx = floors(changes)
    signs, repeat = sign_repeat(prev_signs, changes)
    sizes = {"full_bf16": 8 + len(header) + 2 * total, "trl_raw": len(raw),
             "raw_zstd": len(zstandard.ZstdCompressor(level=3).compress(raw)), **{k: len(v) for k, v in blobs.items()},
             "entropy_floor": int(floor0 / 8), "conditional_floor": int(floor_ctx / 8)}
    del raw
    paths = {}
    exact = {}
    for name, blob in blobs.items():
        # Bit-exactness of what a replica decodes, through the Follower's apply path.
        paths[name] = tmp / f"d{version}-{name}.safetensors"
        paths[name].write_bytes(blob)
        state = {k: v.clone() for k, v in prev.items()}
        apply_to_state(state, read_patch_file(paths[name]))
        exact[name] = all(torch.equal(state[k].view(torch.int16), cur[k].view(torch.int16)) for k in cur)
        del state
    per_tensor = json.loads(read_patch_file(paths["ctx"]).metadata["tensors"])
    fallback = [n for n, e in per_tensor.items() if e.get("encoding", "ctx") != "ctx"]
    out = {
        "version": version, "changed": int(changed), "total": int(total), "density": changed / total,
        "bytes": sizes, "bytes_per_changed": {k: (v / changed if changed else None) for k, v in sizes.items()},
        "bit_exact": exact, "ctx_fallback_tensors": len(fallback), "tensors": len(per_tensor),
        "sign_repeat": repeat,
    }
    if not timing:
        return out, signs
    del changes
    out["time"] = codec_rounds(prev, cur, paths, version=version, repeats=repeats)
    return out, signs


def codec_rounds(prev, cur, paths: dict, *, version: int, repeats: int, against=None) -> dict:
    """`timed_rounds` of one `torch.ne` pass over the model (as written, and into outputs kept between rounds), the
    publisher's detect + encode and a replica's decode +
    resolve for each of `CODECS` (`paths[encoding]`: the delta from `prev` to `cur` written in it). `against`:
    another implementation's `formats` module (`synthetic.py --against`), timed in the same rounds under names
    ending in ``@against`` -- two revisions compared side by side in one process and memory state, taking turns at
    going first (`timed_rounds`' `alternate`)."""
    total = sum(t.numel() for t in cur.values())

    def ne_pass():
        for name, c in cur.items():
            torch.ne(c.view(torch.int16), prev[name].view(torch.int16))

    # The same pass into outputs kept between rounds: no allocator in it. The allocating pass (the reference,
    # what a user writes) measured 105-434 ms within one scenario's rounds on this VM, by whether its 600 MB of bool
    # outputs came from resident memory or fresh pages; this one is the memory floor it stands for.
    kept = {name: torch.empty(c.shape, dtype=torch.bool) for name, c in cur.items()}

    def ne_kept():
        for name, c in cur.items():
            torch.ne(c.view(torch.int16), prev[name].view(torch.int16), out=kept[name])

    base_bits = {name: bits(t).reshape(-1) for name, t in prev.items()}

    def codec_fns(fmt, suffix: str) -> dict:
        def detect_encode(encoding):
            def run():
                # The publisher's detection (one read of both versions; for ctx it also ranks each changed element
                # in its exponent class), then its encode.
                ch = fmt.diff_state(cur, prev, encoding=encoding)
                fmt.encode_delta(ch, version=version, base=version - 1, total=total, encoding=encoding)
            return run

        def decode(encoding):
            def run():
                pf = fmt.resolve_context(fmt.read_patch_file(paths[encoding]), base_bits)
                for name, d in pf.tensors.items():  # as a replica resolves them (ctx decodes to new bits directly)
                    d.resolve(base_bits[name][d.positions] if d.needs_base else None)
            return run

        return {**{f"detect_encode_{k}{suffix}": detect_encode(k) for k in CODECS},
                **{f"decode_{k}{suffix}": decode(k) for k in CODECS}}

    fns = {"ne_pass": ne_pass, "ne_kept": ne_kept, **codec_fns(formats, "")}
    pairs = {}
    if against is not None:
        fns |= codec_fns(against, "@against")
        pairs = {name: f"{name}@against" for name in fns if not name.startswith("ne_") and not name.endswith("@against")}
    return timed_rounds(fns, repeats, reference=("ne_pass", "ne_kept"), alternate=against is not None, pairs=pairs)


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

    def detect_encode(encoding):
        def run():
            total = sum(t.numel() for t in c.values())
            ch = {}
            for name, (pos, nv, ov) in zip(c, detect_to_host()):
                if pos.numel():
                    # ctx's exponent sort runs on the GPU (the base stays there); only ranks come to the host.
                    ch[name] = TensorChange(tuple(c[name].shape), pos.numpy(), nv.numpy().view(np.uint16),
                                            ov.numpy().view(np.uint16), base=p[name].reshape(-1))
            encode_delta(ch, version=1, base=0, total=total, encoding=encoding)
        return run

    return {"available": True, "device": torch.cuda.get_device_name(0),
            "ne_pass": timed(sync(ne_pass), repeats), "detect_to_host": timed(sync(detect_to_host), repeats),
            **{f"detect_encode_{k}": timed(sync(detect_encode(k)), repeats) for k in CODECS}}


_FIRST_USE = """
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from shared.formats import TensorChange, encode_delta
t0 = time.perf_counter()  # after torch/safetensors imports: what numba adds (its import, cache load or compile)
base = (np.arange(4096, dtype=np.uint16) % 512) + 0x3C00
new = base.copy()
new[::5] += 1
for enc in ("compact", "ctx"):
    ch = TensorChange.between((4096,), new, base, encoding=enc)
    blob = encode_delta({"w": ch}, version=1, base=0, total=4096, encoding=enc, verify=True)
print(time.perf_counter() - t0)
"""


def first_use_s(*, cold: bool) -> float:
    """Seconds a fresh process takes to import the codec and encode + decode one small tensor with each encoding:
    with numba's on-disk cache as it is (what every process after the first pays), or with an empty cache (the
    one-time compile). Timed runs below exclude it: each is warmed up first."""
    import subprocess

    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", _FIRST_USE, str(Path(__file__).resolve().parents[1])], env=env,
                             capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    scenarios = QUICK_SCENARIOS if args.quick else FULL_SCENARIOS
    if args.only:
        scenarios = [sc for sc in scenarios if sc[0] in args.only.split(",")]
    model, cfg = build_model(args.quick, args.seed, args.mid)
    n_params = sum(p.numel() for p in model.parameters())
    shape = "tiny" if args.quick else "mid (4x1024)" if args.mid else "Qwen3-0.6B"
    log(f"model: {shape}, {n_params:,} parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads")
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="dws-bench-"))
    gen = torch.Generator().manual_seed(args.seed)
    gpu = None

    def train(opt, steps: int) -> float:
        step_s = 0.0
        for _ in range(steps):
            ids = torch.randint(0, min(cfg.vocab_size, 32000), (args.batch, args.seq), generator=gen)
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - t0
        return step_s

    for name, lr, gap, n_deltas, warm in scenarios:
        init_weights(model, args.seed)
        opt = None
        gc.collect()
        # foreach=False: the fused multi-tensor path holds temporaries the size of the model (0.6B: +2.4 GB).
        opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
        if warm:
            log(f"{name}: {warm} warm-up steps")
            train(opt, warm)
        prev = snapshot(model)
        deltas = []
        prev_signs = None
        for i in range(n_deltas):
            step_s = train(opt, gap)
            cur = snapshot(model)
            last = i == n_deltas - 1 and (not args.time or name in args.time.split(","))
            d, prev_signs = measure_delta(prev, cur, version=i + 1, repeats=args.repeats, tmp=tmp, timing=last,
                                          prev_signs=prev_signs)
            d["train_step_s"] = step_s
            deltas.append(d)
            bpc = d["bytes_per_changed"]
            log(f"{name} delta {i + 1}/{n_deltas}: {d['density'] * 100:.3f}% changed; B/changed: compact "
                f"{bpc['compact']:.3f}, ctx {bpc['ctx']:.3f}, floor {bpc['entropy_floor']:.3f}, conditional floor "
                f"{bpc['conditional_floor']:.3f}; bit-exact {d['bit_exact']}"
                + (f"; encode ctx {d['time']['detect_encode_ctx']['median_s']:.2f}s vs ne "
                   f"{d['time']['ne_pass']['median_s']:.3f}s" if last else ""))
            if gpu is None and last:
                gpu = gpu_rows(prev, cur, args.repeats)
            prev = cur
        results.append({"scenario": name, "lr": lr, "publish_every": gap, "warmup_steps": warm, "deltas": deltas})
        if args.partial:
            # A long run on a shared machine: what is measured so far survives an OOM kill.
            Path(args.partial).write_text(json.dumps(results, indent=1))
    return {
        "date": dt.date.today().isoformat(),
        "mode": "quick" if args.quick else "full",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": {"parameters": n_params, "shape": shape},
        "batch": [args.batch, args.seq],
        "scenarios": results,
        "gpu": gpu,
        "numba_first_use_s": {"cached": first_use_s(cold=False), "compile": first_use_s(cold=True)},
    }


def summarize(res: dict) -> list[dict]:
    rows = []
    for sc in res["scenarios"]:
        ds = sc["deltas"]
        timed_d = [d for d in ds if "time" in d]
        med = lambda f, xs=ds: statistics.median(f(d) for d in xs)  # noqa: E731
        t = lambda key: med(lambda d: d["time"][key]["median_s"], timed_d) if timed_d else math.nan  # noqa: E731

        def over_ne(key: str, ref: str = "ne_pass", timed_d: list = timed_d) -> float:
            """The per-round ratio (`timed_rounds`); results written before it: the ratio of the medians (and
            before `ne_kept` was timed: nan for it)."""
            if not timed_d or ref not in timed_d[0]["time"]:
                return math.nan
            return med(lambda d: d["time"][key].get(f"over_{ref}", d["time"][key]["median_s"]
                                                     / d["time"][ref]["median_s"]), timed_d)

        repeats = [d["sign_repeat"] for d in ds if d.get("sign_repeat")]
        rows.append({
            "scenario": sc["scenario"], "density_pct": 100 * med(lambda d: d["density"]),
            **{f"bpce_{k}": med(lambda d, k=k: d["bytes_per_changed"][k] or 0) for k in FORMATS},
            "ctx_vs_floor": med(lambda d: d["bytes"]["ctx"] / max(d["bytes"]["entropy_floor"], 1)),
            "ctx_vs_compact": med(lambda d: d["bytes"]["ctx"] / d["bytes"]["compact"]),
            "ne_ms": 1e3 * t("ne_pass"),
            "ne_kept_ms": 1e3 * t("ne_kept") if timed_d and "ne_kept" in timed_d[0]["time"] else math.nan,
            **{f"encode_{k}_ms": 1e3 * t(f"detect_encode_{k}") for k in CODECS},
            **{f"decode_{k}_ms": 1e3 * t(f"decode_{k}") for k in CODECS},
            **{f"encode_{k}_over_ne": over_ne(f"detect_encode_{k}") for k in CODECS},
            **{f"decode_{k}_over_ne": over_ne(f"decode_{k}") for k in CODECS},
            **{f"{op}_{k}_over_ne_kept": over_ne(f"{'detect_encode' if op == 'encode' else op}_{k}", "ne_kept")
               for op in ("encode", "decode") for k in CODECS},
            "sign_repeat_bits_saved": statistics.median(r["bits_saved_per_changed"] for r in repeats) if repeats
            else None,
            "bit_exact": all(all(d["bit_exact"].values()) for d in ds),
        })
    return rows


def table(rows: list[dict], gpu: dict | None) -> str:
    head = ("| scenario | changed % | TRL raw | raw+zstd | compact | **ctx (v2)** | order-0 floor | conditional floor |"
            " ctx / floor | bit-exact |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['density_pct']:.3f} | {r['bpce_trl_raw']:.2f} | {r['bpce_raw_zstd']:.2f} |"
                     f" {r['bpce_compact']:.3f} | **{r['bpce_ctx']:.3f}** | {r['bpce_entropy_floor']:.3f} |"
                     f" {r['bpce_conditional_floor']:.3f} | {r['ctx_vs_floor']:.2f} | {'yes' if r['bit_exact'] else 'NO'} |")
    lines += ["", "(bytes per changed element, medians over each scenario's deltas)", "",
              "| scenario | torch.ne ms (kept output) | encode compact ms (×ne, ×kept) | encode ctx ms (×ne, ×kept) |"
              " decode compact ms (×ne, ×kept) | decode ctx ms (×ne, ×kept) | sign-repeat context would save"
              " (bits/changed) |",
              "|" + "---|" * 7]

    def cell(r: dict, op: str, k: str) -> str:
        kept = r[f"{op}_{k}_over_ne_kept"]
        return (f"{r[f'{op}_{k}_ms']:.0f} ({r[f'{op}_{k}_over_ne']:.1f}×"
                + ("" if math.isnan(kept) else f", {kept:.1f}×") + ")")

    for r in rows:
        sr = r["sign_repeat_bits_saved"]
        if math.isnan(r["ne_ms"]):
            lines.append(f"| {r['scenario']} | not timed (--time) | | | | | {'-' if sr is None else f'{sr:.3f}'} |")
            continue
        ne = f"{r['ne_ms']:.1f}" + ("" if math.isnan(r["ne_kept_ms"]) else f" ({r['ne_kept_ms']:.1f})")
        lines.append(f"| {r['scenario']} | {ne} | {cell(r, 'encode', 'compact')} | {cell(r, 'encode', 'ctx')} |"
                     f" {cell(r, 'decode', 'compact')} | {cell(r, 'decode', 'ctx')} | {'-' if sr is None else f'{sr:.3f}'} |")
    lines.append("")
    lines.append("(times: medians over repeats on the last delta of each scenario, this machine's CPU; ×ne: the median"
                 " of each round's ratio to one `torch.ne` pass, every function timed once per round; ×kept: the same"
                 " against `torch.ne` into outputs kept between rounds -- the allocating pass swings 105-434 ms on this"
                 " VM by whether its 600 MB of outputs land on resident or fresh pages)")
    if gpu and gpu.get("available"):
        lines.append(f"GPU ({gpu['device']}): torch.ne pass {gpu['ne_pass']['median_s'] * 1e3:.2f} ms, detect + copy to "
                     f"host {gpu['detect_to_host']['median_s'] * 1e3:.2f} ms, detect + encode compact "
                     f"{gpu['detect_encode_compact']['median_s'] * 1e3:.2f} ms, ctx "
                     f"{gpu['detect_encode_ctx']['median_s'] * 1e3:.2f} ms")
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
    shown = [f for f in FORMATS if f != "full_bf16"]
    width = 0.8 / len(shown)
    x = np.arange(len(rows))
    for i, f in enumerate(shown):
        ax.bar(x + i * width, [r[f"bpce_{f}"] for r in rows], width, label=f.replace("_", " "))
    ax.set_yscale("log")
    ax.set_xticks(x + width * (len(shown) - 1) / 2, [r["scenario"] for r in rows], fontsize=8)
    ax.set_ylabel("bytes per changed element (median, log)")
    ax.set_title(f"payload by format — {res['model']['shape']} ({res['model']['parameters']:,} params)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
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
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed runs per figure (medians; this shared machine varies ~20 %% run to run)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mid", action="store_true", help="the 86 M-parameter 4x1024 model instead of 0.6B")
    ap.add_argument("--time", default="", help="comma-separated scenarios whose last delta is timed (default: all)")
    ap.add_argument("--only", default="", help="comma-separated scenario names to run (default: all)")
    ap.add_argument("--partial", default="", help="also write the scenarios measured so far to this file")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's results, run nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep the scenarios of the existing --out file that this run does not re-measure")
    args = ap.parse_args(argv)
    if args.plot_only:
        res = json.loads(Path(args.out).read_text())
        plot(res, res["summary"], Path(args.plot))
        return 0
    res = run(args)
    out = Path(args.out)
    if args.merge and out.exists():
        # Re-measured scenarios replace their old rows; the others stay, each with the date it was measured on.
        old = json.loads(out.read_text())
        for sc in res["scenarios"]:
            sc["date"] = res["date"]
        fresh = {sc["scenario"] for sc in res["scenarios"]}
        kept = [dict(sc, date=sc.get("date", old.get("date"))) for sc in old.get("scenarios", [])
                if sc["scenario"] not in fresh]
        order = [sc[0] for sc in (QUICK_SCENARIOS if args.quick else FULL_SCENARIOS)]
        res["scenarios"] = sorted(kept + res["scenarios"],
                                  key=lambda sc: order.index(sc["scenario"]) if sc["scenario"] in order else 99)
    rows = summarize(res)
    res["summary"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res, rows, Path(args.plot))
    print(table(rows, res["gpu"]))
    nb = res.get("numba_first_use_s")
    if nb:
        print(f"codec kernels (numba): a fresh process's first encode+decode {nb['cached']:.2f} s with the on-disk "
              f"cache, {nb['compile']:.1f} s compiling from scratch (once per machine); timed runs are warmed up")
    print(f"\nresults: {out}" + (f", plot: {args.plot}" if args.plot else ""))
    return 0 if all(r["bit_exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
