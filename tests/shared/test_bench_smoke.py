"""`make bench --quick` must keep working (the full run is manual). No timing is asserted: only that it runs, that
every format is measured on the same deltas, and that the compact and ctx deltas decode bit-exactly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_runs_and_reports_every_format(tmp_path):
    out = tmp_path / "results.json"
    plot = tmp_path / "results.png" if importlib.util.find_spec("matplotlib") else ""
    proc = subprocess.run([sys.executable, str(REPO / "bench/run.py"), "--quick", "--repeats", "1", "--seq", "16",
                           "--out", str(out), "--plot", str(plot)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and res["scenarios"]
    for sc in res["scenarios"]:
        for d in sc["deltas"]:
            assert d["bit_exact"] == {"compact": True, "ctx": True}
            b = d["bytes"]
            assert set(b) == {"full_bf16", "trl_raw", "raw_zstd", "compact", "ctx", "entropy_floor",
                              "conditional_floor"}
            assert b["entropy_floor"] <= b["compact"] < b["trl_raw"] < b["full_bf16"]
            assert b["conditional_floor"] <= b["entropy_floor"] and b["conditional_floor"] <= b["ctx"] < b["trl_raw"]
    timed = [d["time"] for sc in res["scenarios"] for d in sc["deltas"] if "time" in d]
    assert timed, "the last delta of a scenario is timed"
    for t in timed:  # side by side: every function's ratio to torch.ne is taken round by round
        assert t["ne_pass"]["over_ne_pass"] == 1.0 and t["ne_kept"]["over_ne_kept"] == 1.0
        assert all(t[k]["over_ne_pass"] > 0 and t[k]["over_ne_kept"] > 0 and t[k]["median_s"] > 0 for k in t)
    assert any(sc["warmup_steps"] for sc in res["scenarios"]), "the warm scenario must be part of the run"
    assert "| scenario |" in proc.stdout
    assert "GPU rows: no GPU" in proc.stdout or "GPU (" in proc.stdout
    if plot:
        assert plot.stat().st_size > 1000


def test_synthetic_side_by_side_runs_and_reports_ratios(tmp_path):
    """bench/synthetic.py (the codec against torch.ne on a synthetic delta, no training) runs small and reports each
    function's per-round ratio; bad arguments get a usage error, not a traceback."""
    out = tmp_path / "synthetic.json"
    cmd = [sys.executable, str(REPO / "bench/synthetic.py"), "--layers", "1", "--vocab", "512", "--repeats", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert 0 < res["changed"] < res["total"]
    assert set(res["time"]) == {"ne_pass", "ne_kept", "detect_encode_compact", "detect_encode_ctx",
                                "decode_compact", "decode_ctx"}
    assert all(t["over_ne_pass"] > 0 and t["over_ne_kept"] > 0 for t in res["time"].values())
    assert "x torch.ne" in proc.stdout and "x kept" in proc.stdout
    bad = subprocess.run([*cmd, "--lr", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--lr > 0" in bad.stderr and "Traceback" not in bad.stderr


def test_synthetic_times_another_checkout_in_the_same_rounds(tmp_path):
    """--against CHECKOUT: that checkout's `shared` (here this very one) imported under another name, its detect +
    encode and decode timed in the same rounds as ours; a path without the package is a usage error."""
    out = tmp_path / "against.json"
    cmd = [sys.executable, str(REPO / "bench/synthetic.py"), "--layers", "0", "--vocab", "512", "--repeats", "1"]
    proc = subprocess.run([*cmd, "--against", str(REPO), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    times = json.loads(out.read_text())["time"]
    ours = {"detect_encode_compact", "detect_encode_ctx", "decode_compact", "decode_ctx"}
    assert set(times) == {"ne_pass", "ne_kept", *ours, *(f"{k}@against" for k in ours)}
    assert all(t["over_ne_pass"] > 0 for t in times.values())
    # Each of ours also gets its time over its @against counterpart's, round by round.
    assert all(times[k]["over_pair"] > 0 for k in ours) and not any("over_pair" in times[k] for k in times
                                                                  if k not in ours)
    assert "x its @against" in proc.stdout
    bad = subprocess.run([*cmd, "--against", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "holds no shared/formats.py" in bad.stderr and "Traceback" not in bad.stderr


def test_timed_rounds_alternate_the_order_every_other_round():
    """`--against` comparisons take turns going first; the plain bench keeps one order. The ratio to the reference
    is still taken within each round."""
    sys.path.insert(0, str(REPO))
    from bench.run import timed_rounds

    for alternate, want in ((False, ["ref", "a", "b"] * 4), (True, ["ref", "a", "b", "b", "a", "ref"] * 2)):
        calls: list[str] = []
        fns = {name: (lambda n=name: calls.append(n)) for name in ("ref", "a", "b")}
        res = timed_rounds(fns, 4, reference="ref", alternate=alternate)
        assert calls[3:] == want  # after one warm-up call each
        assert res["ref"]["over_ref"] == 1.0 and res["a"]["over_ref"] > 0


def test_timed_rounds_pair_ratio_is_the_median_of_per_round_ratios(monkeypatch):
    """`pairs` gives a function its time over its partner's in each round, then the median (and each of several
    references, its ratio to each) -- on a fake clock, each call advancing it by that function's cost in that
    round."""
    sys.path.insert(0, str(REPO))
    import bench.run as bench_run

    clock = [0.0]
    monkeypatch.setattr(bench_run.time, "perf_counter", lambda: clock[0])
    costs = {"ref": [0, 1, 1, 1], "a": [0, 1, 3, 1], "b": [0, 2, 2, 4]}  # the warm-up call, then three rounds
    left = {name: iter(c) for name, c in costs.items()}

    def call(name: str) -> None:
        clock[0] += next(left[name])

    res = bench_run.timed_rounds({n: (lambda n=n: call(n)) for n in costs}, 3, reference=("ref", "b"),
                                 pairs={"a": "b"})
    assert res["a"]["over_pair"] == 0.5  # a / b per round: 0.5, 1.5, 0.25
    assert res["a"]["over_ref"] == 1.0 and res["b"]["over_ref"] == 2.0
    assert res["a"]["over_b"] == 0.5 and res["ref"]["over_b"] == 0.5  # a second reference: a ratio to each
    assert "over_pair" not in res["b"] and "over_pair" not in res["ref"]
