"""Trainer benchmark: TRL's AsyncGRPOTrainer path (this tree) against the synchronous GRPOTrainer + one-batch
prefetch it replaced (commit c54aba2, checked out as a git worktree), same task, model, steps and replicas.

Per trial: a fresh local-folder bucket, env_space and two rollout replicas (real vLLM on CPU, 1 s bucket poll) started
from their venvs through dws_tools.launch, then one trainer run as a subprocess (`python -m trainer_space`, the
trainer venv). The old side runs every service from its worktree (same venvs): its bucket format is its replicas'. Trials alternate new / old so that slow drift of the machine
hits both. From the trainer's own `GET /status` at the end:

* steps per minute (first to last optimizer step, so start-up is not counted);
* share of the trainer's step time spent waiting for rollouts -- new: TRL's `perf/rollout_wait_s` (blocked on an
  empty sample queue); old: generation the training loop waited for plus the staleness guard's waits;
* samples dropped as stale -- new: TRL's `sample/dropped_stale_total`; old: rejected batches x batch size.

Medians over the trials of each side go to bench/trainer.json. Usage (from the repo root, after `make venvs`):

    git worktree add /tmp/oldtrainer c54aba2
    .venv/trainer/bin/python bench/trainer.py --old /tmp/oldtrainer --trials 2 --steps 20
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dws_tools import launch  # noqa: E402
from dws_tools.launch import ServiceSpec, Stack, free_port  # noqa: E402
from dws_tools.tiny_model import build_tiny_model  # noqa: E402

TOKEN = "bench-trainer-token"


def _replicas_and_env(stack: Stack, work: Path, model: Path, bucket: Path) -> tuple[str, list[str]]:
    env_port = free_port()
    env = stack.start(ServiceSpec(name="env", space="env", port=env_port, env={"DWS_UI": "false"},
                                  args=["--host", "127.0.0.1", "--port", str(env_port)]))
    reps = []
    for i in range(2):
        port = free_port()
        reps.append(stack.start(ServiceSpec(
            name=f"rollout-{i + 1}", space="rollout", port=port,
            env={"DWS_API_KEY": TOKEN, "VLLM_CACHE_ROOT": str(work / f"vllm-cache-{i + 1}")},
            args=["--model", str(model), "--bucket", str(bucket), "--host", "127.0.0.1", "--port", str(port),
                  "--poll-interval", "1", "--max-model-len", "512", "--no-ui",
                  "--vllm-log", str(work / f"vllm-{i + 1}.log"), "--vllm-args=--enforce-eager"])))
    env.wait_healthy()
    for r in reps:
        r.wait_healthy()
    return env.url, [r.url for r in reps]


def _run_trainer(side: str, code: Path, *, model: Path, bucket: Path, env_url: str, rollouts: list[str], steps: int,
                 work: Path, log: Path) -> dict:
    port = free_port()
    args = [str(REPO / ".venv" / "trainer" / "bin" / "python"), "-m", "trainer_space", "--model", str(model),
            "--bucket", str(bucket), *[a for u in rollouts for a in ("--rollout-url", u)], "--env-url", env_url,
            "--task", "short", "--steps", str(steps), "--lr", "1e-2", "--prompts-per-step", "4", "--group-size", "8",
            "--max-completion-length", "8", "--staleness", "1", "--host", "127.0.0.1", "--port", str(port),
            "--no-ui", "--output-dir", str(work / f"out-{side}")]
    if side == "new":
        args.append("--no-exit-when-done")  # keep /status up until it is read
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWS_") and k != "SPACE_ID"}
    env.update(DWS_ROLLOUT_TOKEN=TOKEN, PYTHONUNBUFFERED="1", TRL_EXPERIMENTAL_SILENCE="1")
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        st = None
        while time.monotonic() - t0 < 1800:
            if proc.poll() is not None:
                raise RuntimeError(f"{side} trainer exited (rc {proc.returncode}); see {log}")
            try:
                st = httpx.get(f"http://127.0.0.1:{port}/status", timeout=30).json()
            except httpx.HTTPError:
                st = None
            if st and st.get("phase") in ("done", "failed"):
                break
            time.sleep(2)
        if not st or st.get("phase") != "done":
            raise RuntimeError(f"{side} trainer did not finish: {st and st.get('error')}; see {log}")
        return st
    finally:
        try:
            os.killpg(proc.pid, 15)
        except ProcessLookupError:  # already gone
            pass
        proc.wait(timeout=60)


def _figures(side: str, st: dict, batch: int) -> dict:
    hist = st["training"]["history"]
    step_s = sum(h.get("step_s") or 0 for h in hist)
    if side == "new":
        wait = sum(h.get("rollout_wait_s") or 0 for h in hist)
        dropped = int(sum(h.get("dropped_stale") or 0 for h in hist))
    else:
        wait = sum((h.get("generate_s") or 0) + (h.get("wait_s") or 0) for h in hist)
        dropped = batch * sum(len(b.get("rejected_lags") or []) for b in st.get("batches") or [])
    rewards = [h.get("reward_mean") for h in hist if h.get("reward_mean") is not None]
    return {"steps": len(hist), "steps_per_min": round(st["training"]["steps_per_min"], 2),
            "s_per_step": round(step_s / len(hist), 3), "rollout_wait_share": round(wait / step_s, 3),
            "samples_dropped_stale": dropped, "reward_first3": round(statistics.mean(rewards[:3]), 3),
            "reward_last3": round(statistics.mean(rewards[-3:]), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="worktree of the synchronous trainer (commit c54aba2)")
    ap.add_argument("--trials", type=int, default=2, help="runs per side (median reported)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "trainer.json")
    ns = ap.parse_args(argv)
    if not (ns.old / "trainer_space" / "grpo.py").exists():
        ap.error(f"{ns.old} is not a checkout of the synchronous trainer (no trainer_space/grpo.py)")
    work = Path(tempfile.mkdtemp(prefix="dws-bench-trainer-"))
    model = build_tiny_model(work / "tiny-model")
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    for trial in range(ns.trials):
        for side in ("new", "old"):
            bucket = work / f"bucket-{side}-{trial}"
            # Each side runs its own code for every service: the old trainer's bucket format is the old replicas'.
            launch.REPO = REPO if side == "new" else ns.old
            with Stack(venv_root=REPO / ".venv", log_dir=work / f"logs-{side}-{trial}") as stack:
                env_url, rollouts = _replicas_and_env(stack, work, model, bucket)
                code = REPO if side == "new" else ns.old
                st = _run_trainer(side, code, model=model, bucket=bucket, env_url=env_url, rollouts=rollouts,
                                  steps=ns.steps, work=work, log=work / f"trainer-{side}-{trial}.log")
            fig = _figures(side, st, batch=32)
            runs[side].append(fig)
            print(f"trial {trial + 1} {side}: {fig}", flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, no GPU, shared with the "
              "replicas' vLLM engines", "setup": {"task": "short", "steps": ns.steps, "replicas": 2,
                                                  "prompts_per_step": 4, "group_size": 8, "max_completion_length": 8,
                                                  "lr": 1e-2, "max_staleness": 1, "trials_per_side": ns.trials},
              "median": med, "runs": runs}
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(med, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
