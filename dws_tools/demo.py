"""`make demo` and the end-to-end test: the whole system on one machine, as separate processes.

Owns the local orchestration: build the tiny model, start env_space, rollout replica 1 (real vLLM) and the trainer on
127.0.0.1 -- each from its own Space's venv with its production command (`python -m <space>`, what the Dockerfiles
run) -- and keep a light inference load on every replica while it syncs. The late join: the trainer trains to
version `--late-after` and is then stopped, as a Space restart would stop it; the last replica starts (it must catch
up from an anchor + deltas, v0 being long retired) and, once it serves, the trainer is started again on the same
bucket: it restores the latest version and continues. So the late replica is up while training runs, serves the
trainer's requests and follows every version published after it joined -- by construction, not by a race between a
vLLM start and the training speed on this machine. At the end, what each service *measured* (the trainer's
per-version digests, each replica's per-version verified digests, pauses, request counts) goes into a JSON report
and a summary table. Ctrl-C (or SIGTERM) at any moment stops every child process group.

The checks printed at the end are the ones CI asserts (tests/e2e): every version each replica went through was served
bit-exact (the digest the replica hashed equals the trainer's), zero failed inference requests, reward up, every delta
under a tenth of an anchor, and `dws verify` on the final bucket.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from dws_tools.launch import REPO, LaunchError, LocalService, ServiceSpec, Stack, free_port, port_free
from shared.wire import MODEL_VERSION_FIELD, ReplicaStatus

log = logging.getLogger("dws.demo")


@dataclass(kw_only=True)
class DemoOptions:
    dir: Path
    bucket: str | None = None
    model: str | None = None
    steps: int = 40
    lr: float = 5e-3
    optim: str = "adamw_torch"
    # A randomly initialised model only learns within a minute at a rate at which AdamW rewrites 60-99 % of all
    # weights every step -- nothing like real RL (bench: 1-3 % at lr 1e-6 on a 0.6B model). So the demo trains the
    # tied embedding / output matrix only (12 % of the tiny model): it learns fast, and deltas stay sparse.
    trainable: str | None = "embed_tokens"
    prompts_per_step: int = 4
    group_size: int = 8  # 32 completions per step: less gradient noise, so fewer weights cross a bf16 rounding step
    task: str = "short"
    replicas: int = 2
    late_after: int = 12  # versions published before the last replica starts (it must catch up from an anchor)
    min_followed: int = 10  # versions the late replica must see published after it joined
    anchor_every: int = 5
    port_base: int = 7860  # trainer, env, rollout-1, rollout-2...; 0: free ports
    exit_when_done: bool = False
    report: Path | None = None
    venv_root: Path = REPO / ".venv"
    load: bool = True
    converge_timeout_s: float = 300.0


class LoadClient(threading.Thread):
    """One completion request in flight at a time against one replica, for as long as the demo trains: proof that
    inference keeps working while the replica pauses to apply versions. Every non-200 or untagged answer counts as a
    failure, with its reason kept."""

    def __init__(self, svc: LocalService, *, token: str) -> None:
        super().__init__(daemon=True, name=f"load-{svc.name}")
        self.svc = svc
        self.token = token
        self.stop_event = threading.Event()
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.versions: set[int] = set()

    def run(self) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {self.token}"}, timeout=120) as http:
            try:
                model = http.get(f"{self.svc.url}/v1/models").json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                self._fail(f"/v1/models: {exc}")
                return
            while not self.stop_event.is_set():
                try:
                    r = http.post(f"{self.svc.url}/v1/completions",
                                  json={"model": model, "prompt": "The answer is", "max_tokens": 6, "temperature": 0})
                    body = r.json() if r.status_code == 200 else {}
                    if r.status_code != 200 or MODEL_VERSION_FIELD not in body:
                        self._fail(f"HTTP {r.status_code}: {r.text[:200]}")
                    else:
                        self.ok += 1
                        if body[MODEL_VERSION_FIELD] is not None:
                            self.versions.add(int(body[MODEL_VERSION_FIELD]))
                except httpx.HTTPError as exc:
                    self._fail(f"{type(exc).__name__}: {exc}")
                self.stop_event.wait(0.25)

    def _fail(self, why: str) -> None:
        self.failed += 1
        if len(self.errors) < 20:
            self.errors.append(why)


@dataclass(kw_only=True)
class Replica:
    svc: LocalService
    started_at_version: int | None
    load: LoadClient | None = None
    healthy: bool = False
    ready_at_version: int | None = None  # the newest version published when it first served
    join_plan: str | None = None  # how its first sync reached that version (anchor + deltas)
    status: dict = field(default_factory=dict)


def _steps(trainer_status: dict) -> list[dict]:
    """The trainer's per-optimizer-step rows (GET /status → training.history)."""
    return [s for s in (trainer_status.get("training") or {}).get("history") or [] if "step" in s]


def _publishes(trainer_status: dict) -> list[dict]:
    """The trainer's per-version publish reports (GET /status → sync.history), oldest first."""
    return sorted((trainer_status.get("sync") or {}).get("history") or [], key=lambda p: p["version"])


def _ports(opts: DemoOptions) -> list[int]:
    n = 2 + opts.replicas
    if opts.port_base == 0:
        return [free_port() for _ in range(n)]
    ports = list(range(opts.port_base, opts.port_base + n))
    taken = [p for p in ports if not port_free(p)]
    if taken:
        raise LaunchError(f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken (another demo still running?). "
                          f"Stop it, or choose other ports: make demo DEMO_FLAGS='--port-base 8860'")
    return ports


def _check_inputs(opts: DemoOptions) -> None:
    if opts.bucket and opts.bucket.startswith("hf://") and not os.environ.get("HF_TOKEN"):
        raise LaunchError(f"bucket {opts.bucket} is on the Hub: set HF_TOKEN (a token with write access) first")
    if opts.replicas < 1:
        raise LaunchError("--replicas must be at least 1")
    if opts.steps < 2:
        raise LaunchError("--steps must be at least 2 (reward is compared between the first and last steps)")
    if opts.replicas > 1 and opts.steps - opts.late_after < opts.min_followed:
        raise LaunchError(f"--steps {opts.steps} leaves {opts.steps - opts.late_after} versions after the late "
                          f"replica joins at v{opts.late_after}; it must follow at least {opts.min_followed}: raise "
                          "--steps or lower --late-after")


class Demo:
    def __init__(self, opts: DemoOptions, *, out=print) -> None:
        self.opts = opts
        self.out = out
        self.token = secrets.token_urlsafe(24)  # bearer shared by the three local services; never printed
        self.t0 = time.monotonic()
        self.timings: dict[str, float] = {}

    def say(self, msg: str) -> None:
        self.out(f"[{time.monotonic() - self.t0:6.1f}s] {msg}")

    # -------------------------------------------------------------------------------------------------- set-up
    def prepare(self) -> tuple[str, str]:
        o = self.opts
        o.dir.mkdir(parents=True, exist_ok=True)
        bucket = o.bucket or str(o.dir / "bucket")
        if o.bucket is None and Path(bucket).exists():
            shutil.rmtree(bucket)  # a fresh history each run; a user-given bucket is never wiped
        if o.model:
            model = o.model
        else:
            from dws_tools.tiny_model import build_tiny_model

            model = str(build_tiny_model(o.dir / "tiny-model"))
        return bucket, model

    def specs(self, bucket: str, model: str, ports: list[int]) -> tuple[ServiceSpec, list[ServiceSpec], list[ServiceSpec]]:
        o = self.opts
        # Every child (and vLLM's own children) inherits DWS_DEMO_DIR: one way to find them all, e.g. to prove that
        # nothing outlives the demo (process titles change, environments do not).
        secret_env = {"DWS_API_KEY": self.token, "DWS_DEMO_DIR": str(o.dir.resolve())}
        trainer_port, env_port, *rollout_ports = ports
        env = ServiceSpec(name="env", space="env", port=env_port, env=secret_env,
                          args=["--host", "127.0.0.1", "--port", str(env_port)])
        rollouts = [
            ServiceSpec(name=f"rollout-{i + 1}", space="rollout", port=p,
                        env={**secret_env, "VLLM_CACHE_ROOT": str(o.dir / f"vllm-cache-{i + 1}")},
                        args=["--model", model, "--bucket", bucket, "--host", "127.0.0.1", "--port", str(p),
                              "--poll-interval", "0.5", "--max-model-len", "512",
                              "--vllm-log", str(o.dir / "logs" / f"rollout-{i + 1}-vllm.log"),
                              "--vllm-args=--enforce-eager"])
            for i, p in enumerate(rollout_ports)]
        # A stable run id: a demo restarted on the same (user-given) bucket continues at once, instead of waiting
        # for the lease of the trainer it just stopped to expire.
        # With a late replica the trainer runs twice: up to --late-after, then (restarted on the same bucket) the
        # rest. It keeps serving /status after each part (--no-exit-when-done) until the demo has read it.
        parts = [o.late_after, o.steps - o.late_after] if o.replicas > 1 else [o.steps]
        trainers = [ServiceSpec(
            name="trainer" if i == 0 else "trainer-restarted", space="trainer", port=trainer_port,
            env={**secret_env, "DWS_RUN_ID": f"dws-demo:{o.dir.resolve()}"},
            args=["--model", model, "--bucket", bucket, *[a for r in rollouts for a in ("--rollout-url", r.url)],
                  "--env-url", env.url, "--task", o.task, "--steps", str(n), "--lr", str(o.lr), "--optim", o.optim,
                  *(["--trainable", o.trainable] if o.trainable else []),
                  "--prompts-per-step", str(o.prompts_per_step), "--group-size", str(o.group_size),
                  "--anchor-every", str(o.anchor_every), "--keep-anchors", "2", "--host", "127.0.0.1",
                  "--port", str(trainer_port), "--output-dir", str(o.dir / "trainer-out"), "--no-exit-when-done"])
            for i, n in enumerate(parts)]
        return env, trainers, rollouts

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        o = self.opts
        _check_inputs(o)
        ports = _ports(o)
        bucket, model = self.prepare()
        env_spec, trainer_specs, rollout_specs = self.specs(bucket, model, ports)
        self.say(f"dws demo: model {model}, bucket {bucket}, task {o.task}, {o.steps} steps at lr {o.lr}, "
                 f"{o.replicas} replica(s); logs in {o.dir / 'logs'}")
        with Stack(venv_root=o.venv_root, log_dir=o.dir / "logs") as stack:
            env = stack.start(env_spec)
            first = stack.start(rollout_specs[0])
            self.say(f"env       {env.url}  starting")
            self.say(f"rollout-1 {first.url}  starting (vLLM on CPU takes about a minute)")
            self.timings["env_start_s"] = env.wait_healthy(progress=self.say)
            self.say(f"env       ready in {self.timings['env_start_s']:.1f}s")
            replicas = [Replica(svc=first, started_at_version=None)]
            first.wait_healthy(progress=self.say)
            self._replica_up(replicas[0])
            parts: list[dict] = []  # the trainer's /status at the end of each of its runs
            t_train = time.monotonic()
            for i, spec in enumerate(trainer_specs):
                if i > 0:
                    late = self._join_late(stack, rollout_specs[1:], replicas, final)
                    self.say(f"trainer   restarting on the same bucket: it continues at v{final + 1} while "
                             f"{', '.join(r.svc.name for r in late)} serve(s)")
                trainer = stack.start(spec)
                self.say(f"trainer   {trainer.url}  starting (dashboard at /)")
                started = trainer.wait_healthy(progress=self.say)
                self.timings.setdefault("trainer_start_s", started)
                final = self._train(stack, trainer, replicas, env)
                parts.append(trainer.status())
                if i < len(trainer_specs) - 1:
                    trainer.stop()
                    self.say(f"trainer   stopped at v{final} (as a Space restart would stop it)")
            self.timings["train_s"] = time.monotonic() - t_train
            for r in replicas:
                if not r.healthy:
                    r.svc.wait_healthy(progress=self.say)
                    self._replica_up(r)
            t_conv = time.monotonic()
            self._converge(replicas, final)
            self.timings["converge_s"] = time.monotonic() - t_conv
            for r in replicas:
                if r.load:
                    r.load.stop_event.set()
                    r.load.join(150)
            report = self._report(bucket, model, parts, replicas, env)
            self.print_summary(report)
            if o.report:
                o.report.parent.mkdir(parents=True, exist_ok=True)
                o.report.write_text(json.dumps(report, indent=1))
                self.say(f"report written to {o.report}")
            if not o.exit_when_done:
                self.say("dashboards (Ctrl-C stops everything):")
                for svc in stack.services:
                    self.out(f"    {svc.name:<10} {svc.url}/")
                while all(s.alive() for s in stack.services):
                    time.sleep(1)
                dead = [s for s in stack.services if not s.alive()]
                raise LaunchError(f"{dead[0].name} exited; last lines of {dead[0].log}:\n{dead[0].tail()}")
        return report

    def _replica_up(self, r: Replica) -> None:
        r.healthy = True
        self.timings[f"{r.svc.name}_start_s"] = r.svc.healthy_after_s
        self.say(f"{r.svc.name} ready in {r.svc.healthy_after_s:.1f}s at {r.svc.url}")
        if self.opts.load:
            r.load = LoadClient(r.svc, token=self.token)
            r.load.start()

    def _join_late(self, stack: Stack, late: list[ServiceSpec], replicas: list[Replica], at: int) -> list[Replica]:
        """Start the late replica(s) at version `at` and wait until each serves: it catches up from the bucket's
        newest anchor + deltas."""
        joined = []
        for spec in late:
            svc = stack.start(spec)
            r = Replica(svc=svc, started_at_version=at)
            replicas.append(r)
            joined.append(r)
            self.say(f"{spec.name} {svc.url}  starting late, at v{at} (it must catch up from an anchor)")
        auth = {"Authorization": f"Bearer {self.token}"}
        for r in joined:
            r.svc.wait_healthy(progress=self.say)
            deadline = time.monotonic() + self.opts.converge_timeout_s
            while True:  # serving what the bucket holds: its first sync is its catch-up
                st = ReplicaStatus.model_validate(r.svc.status(timeout=10))
                if st.served_version == at and st.last_sync is not None:
                    break
                if time.monotonic() > deadline:
                    raise LaunchError(f"{r.svc.name} did not reach v{at} within {self.opts.converge_timeout_s:.0f}s")
                httpx.post(f"{r.svc.url}/sync", headers=auth, timeout=10)
                time.sleep(0.5)
            r.join_plan = st.last_sync.plan
            r.ready_at_version = at
            self.say(f"{r.svc.name} serves v{at} ({r.join_plan})")
            self._replica_up(r)
        return joined

    def _train(self, stack: Stack, trainer: LocalService, replicas: list[Replica], env: LocalService) -> int:
        """Follow one trainer run to its end; returns the last version it published."""
        next_line = 0.0
        while True:
            for s in stack.services:
                if s is trainer or s.spec.space != "trainer":  # an earlier trainer run was stopped on purpose
                    s.check_alive()
            st = trainer.status()
            pubs = _publishes(st)
            latest = max((p["version"] for p in pubs), default=None)
            for r in replicas:
                if not r.healthy and r.svc.poll_healthy():
                    self._replica_up(r)
            if st["phase"] == "failed":
                raise LaunchError(f"training failed: {st.get('error')}; last lines of {trainer.log}:\n{trainer.tail()}")
            if time.monotonic() >= next_line or st["phase"] == "done":
                self.say(self._progress(st, replicas))
                next_line = time.monotonic() + 5
            target = (st.get("start_version") or 0) + len(_steps(st))
            if st["phase"] == "done" and latest is not None and latest >= target:
                return latest  # the last step's publish report is in: its upload finished

            time.sleep(1)

    def _progress(self, st: dict, replicas: list[Replica]) -> str:
        steps = _steps(st)
        rewards = [s["reward_mean"] for s in steps if s.get("reward_mean") is not None]
        pubs = _publishes(st)
        done = (st.get("start_version") or 0) + len(steps)
        parts = [f"step {done}/{self.opts.steps}"]
        if rewards:
            parts.append(f"reward {rewards[-1]:.2f}")
        if pubs:
            p = pubs[-1]
            parts.append(f"v{p['version']} {'+'.join(p['kinds'])} {p['bytes'] / 1e3:.1f} kB")
        for r in replicas:
            if not r.healthy:
                parts.append(f"{r.svc.name} starting")
                continue
            try:
                rs = r.svc.status(timeout=10)
                rs = ReplicaStatus.model_validate(rs)
                match = {True: "✓", False: "✗", None: "?"}[rs.digest_match]
                parts.append(f"{r.svc.name} v{rs.served_version} {match}")
            except httpx.HTTPError:
                parts.append(f"{r.svc.name} (no status)")
        return " | ".join(parts)

    def _converge(self, replicas: list[Replica], final: int) -> None:
        """Nudge every replica and wait until each serves the final version with a matching digest."""
        deadline = time.monotonic() + self.opts.converge_timeout_s
        auth = {"Authorization": f"Bearer {self.token}"}
        pending = {r.svc.name: r for r in replicas}
        while pending:
            for name, r in list(pending.items()):
                r.svc.check_alive()
                raw = r.svc.status(timeout=10)
                st = ReplicaStatus.model_validate(raw)
                if st.served_version == final and not raw.get("syncing") and st.digest_match:
                    self.say(f"{name} serves v{final}, digest match")
                    del pending[name]
                else:
                    httpx.post(f"{r.svc.url}/sync", headers=auth, timeout=10)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"replica(s) {', '.join(pending)} did not reach v{final} within "
                                  f"{self.opts.converge_timeout_s:.0f}s")
            time.sleep(1)

    # -------------------------------------------------------------------------------------------------- report
    def _report(self, bucket: str, model: str, parts: list[dict], replicas: list[Replica],
                env: LocalService) -> dict:
        """`parts`: the trainer's /status at the end of each of its runs (one, or two around the late join)."""
        from shared.manifest import read_manifest
        from shared.bucket import open_bucket
        from shared.verify import verify_bucket

        steps = [s for st in parts for s in _steps(st)]
        rewards = [s.get("reward_mean") for s in steps]
        pubs = sorted({p["version"]: p for st in parts for p in _publishes(st)}.values(), key=lambda p: p["version"])
        rollouts = [st.get("rollouts") or {} for st in parts]
        trainer_digests = {p["version"]: p["digest"] for p in pubs}
        final = pubs[-1]["version"]
        anchors = [p for p in pubs if p.get("anchor_bytes")]
        deltas = [p for p in pubs if p.get("delta_bytes")]
        anchor_bytes = statistics.median(p["anchor_bytes"] for p in anchors)
        full = 2 * pubs[0]["total"]
        t_verify = time.monotonic()
        verdict = verify_bucket(bucket, token=os.environ.get("HF_TOKEN") or None)
        verify_s = time.monotonic() - t_verify
        m = read_manifest(open_bucket(bucket, token=os.environ.get("HF_TOKEN") or None))

        rep_out = []
        for r in replicas:
            st = r.svc.status()
            verified = ReplicaStatus.model_validate(st).verified()
            first = min(verified) if verified else None
            # A replica that finds several new versions at once applies their deltas in one sync and hashes the
            # result: the versions in between were never served, and the digest of the one it reached covers them.
            expected = sorted(verified)
            exact = [v for v in expected if verified.get(v) == trainer_digests.get(v)]
            passed = sorted(set(range(first, final + 1)) - set(verified)) if first is not None else []
            after = [v for v in exact if r.ready_at_version is not None and v > r.ready_at_version]
            rep_out.append({
                "name": r.svc.name, "url": r.svc.url, "started_at_version": r.started_at_version,
                "ready_at_version": r.ready_at_version, "join_sync_plan": r.join_plan,
                # versions published after it served, each hashed on the replica equal to the trainer's
                "versions_followed_after_join": len(after),
                "start_s": round(r.svc.healthy_after_s or 0, 1), "first_verified_version": first,
                "served_version": st.get("served_version"), "served_digest": st.get("served_digest"),
                "versions_expected": len(expected), "versions_bit_exact": len(exact),
                "mismatched_versions": sorted(set(expected) - set(exact)),
                "versions_passed_within_a_sync": passed,
                "verified_digests": {str(v): d for v, d in sorted(verified.items())},
                "syncs": st.get("syncs"), "sync_failures": st.get("failures"),
                "resyncs_from_anchor": st.get("resyncs_from_anchor"), "pause_ms": st.get("pause_ms"),
                "first_sync_plan": next((h.get("plan") for h in st.get("recent_syncs") or []), None),
                "gateway_requests": st.get("requests"), "gateway_failed_requests": st.get("failed_requests"),
                "load_requests_ok": r.load.ok if r.load else 0, "load_requests_failed": r.load.failed if r.load else 0,
                "load_errors": r.load.errors if r.load else [], "load_versions_seen": len(r.load.versions) if r.load else 0,
                "vllm_restarts": st.get("vllm_restarts")})
        k = max(1, min(3, len(rewards) // 3))
        first_r = [x for x in rewards[:k] if x is not None]
        last_r = [x for x in rewards[-k:] if x is not None]
        per_step = {key: round(statistics.median(s[key] for s in steps if s.get(key) is not None), 4)
                    for key in ("step_s", "rollout_wait_s", "train_s", "publish_block_s")
                    if any(s.get(key) is not None for s in steps)}
        step_total = sum(s.get("step_s") or 0 for s in steps)
        wait_total = sum(s.get("rollout_wait_s") or 0 for s in steps)
        stal = [s["staleness_mean"] for s in steps if s.get("staleness_mean") is not None]
        return {
            "model": model, "bucket": bucket, "task": self.opts.task,
            "steps": len(steps), "lr": self.opts.lr, "final_version": final, "timings_s": {
                k2: round(v, 1) for k2, v in self.timings.items()} | {"verify_s": round(verify_s, 2)},
            "per_step_median_s": per_step,
            "rollouts": {"samples_dropped_stale": int(sum(s.get("dropped_stale") or 0 for s in steps)),
                         "samples_produced": sum(r.get("samples_produced", 0) for r in rollouts),
                         "staleness_mean": statistics.mean(stal) if stal else None,
                         "staleness_max": max((s.get("staleness_max") or 0 for s in steps), default=None),
                         "rollout_wait_share": round(wait_total / step_total, 3) if step_total else None},
            "reward": {"per_step": rewards, "first": statistics.mean(first_r) if first_r else None,
                       "last": statistics.mean(last_r) if last_r else None, "window": k},
            "sizes": {"full_bf16_bytes": full, "anchor_bytes_median": anchor_bytes,
                      "delta_bytes_median": statistics.median(p["delta_bytes"] for p in deltas) if deltas else None,
                      "delta_bytes_max": max((p["delta_bytes"] for p in deltas), default=None),
                      "largest_delta_over_anchor": (max(p["delta_bytes"] for p in deltas) / anchor_bytes
                                                    if deltas else None),
                      "sparsity_median": statistics.median(p["sparsity"] for p in deltas) if deltas else None,
                      "bytes_per_changed_median": statistics.median(p["delta_bytes"] / p["changed"]
                                                                    for p in deltas if p["changed"]) if deltas else None,
                      "anchors": len(anchors), "deltas": len(deltas)},
            "versions": [{"version": p["version"], "kinds": p["kinds"], "delta_bytes": p.get("delta_bytes"),
                          "anchor_bytes": p.get("anchor_bytes"), "changed": p["changed"], "sparsity": p["sparsity"],
                          "encode_s": p.get("encode_s"), "upload_s": p.get("upload_s"), "digest": p["digest"]}
                         for p in pubs],
            "manifest": {"latest": m.latest if m else None,
                         "digests": {str(e.version): e.digest for e in ([*m.anchors, *m.deltas] if m else [])}},
            "verify": {"ok": verdict.ok, "lines": verdict.lines[-5:]},
            "replicas": rep_out,
            "env": env.status(token=self.token),
        }

    def print_summary(self, rep: dict) -> None:
        sz = rep["sizes"]
        rw = rep["reward"]
        rows = [("steps", f"{rep['steps']} (versions v0..v{rep['final_version']})"),
                ("reward first→last", f"{rw['first']:.3f} → {rw['last']:.3f} (mean of {rw['window']} steps)"
                 if rw["first"] is not None and rw["last"] is not None else "n/a"),
                ("full model (bf16)", f"{sz['full_bf16_bytes']:,} B"),
                ("median delta", f"{sz['delta_bytes_median']:,.0f} B ({sz['full_bf16_bytes'] / sz['delta_bytes_median']:.0f}x "
                 f"smaller), largest = {sz['largest_delta_over_anchor']:.3f} of an anchor" if sz["deltas"] else "none"),
                ("median sparsity", f"{100 * sz['sparsity_median']:.2f}% unchanged" if sz["deltas"] else "n/a"),
                ("bytes per changed elem", f"{sz['bytes_per_changed_median']:.2f} (TRL raw layout: 6.0)"
                 if sz["deltas"] else "n/a")]
        for r in rep["replicas"]:
            pm = r["pause_ms"] or {}
            late = (f", then followed {r['versions_followed_after_join']} versions published while it served"
                    if r["ready_at_version"] is not None else "")
            rows.append((f"{r['name']}", f"joined at {'start' if r['started_at_version'] is None else 'v%d' % r['started_at_version']}{late}, "
                         f"bit-exact {r['versions_bit_exact']}/{r['versions_expected']} versions served "
                         f"(v{r['first_verified_version']}..v{rep['final_version']}"
                         + (f"; {len(r['versions_passed_within_a_sync'])} applied within a multi-delta sync"
                            if r["versions_passed_within_a_sync"] else "") + "), median pause "
                         f"{pm.get('median')} ms over {pm.get('count')} syncs, failed requests "
                         f"{(r['gateway_failed_requests'] or 0)} of {r['gateway_requests']}"))
        ro = rep["rollouts"]
        rows.append(("rollouts", f"{ro['samples_produced']} samples produced, {ro['samples_dropped_stale']} dropped as "
                     f"stale, staleness mean {ro['staleness_mean'] or 0:.2f} (max {ro['staleness_max']}), trainer "
                     f"waited for rollouts {100 * (ro['rollout_wait_share'] or 0):.0f}% of its time"))
        rows.append(("dws verify", "OK" if rep["verify"]["ok"] else "FAILED"))
        width = max(len(k) for k, _ in rows)
        self.out("\nsummary")
        for k, v in rows:
            self.out(f"  {k:<{width}}  {v}")

    def checks(self, rep: dict) -> list[str]:
        """What must hold for a good run (the e2e test asserts the same facts itself); returns the failures."""
        bad = []
        for r in rep["replicas"]:
            if (r["versions_expected"] == 0 or r["versions_bit_exact"] != r["versions_expected"]
                    or r["served_version"] != rep["final_version"]):
                bad.append(f"{r['name']}: {r['versions_bit_exact']}/{r['versions_expected']} versions bit-exact")
            if r["gateway_failed_requests"] or r["load_requests_failed"]:
                bad.append(f"{r['name']}: failed requests {r['gateway_failed_requests']} / load {r['load_errors'][:3]}")
            if r["ready_at_version"] is not None and r["versions_followed_after_join"] < self.opts.min_followed:
                bad.append(f"{r['name']}: followed {r['versions_followed_after_join']} versions after joining, "
                           f"fewer than {self.opts.min_followed}")
        if not rep["verify"]["ok"]:
            bad.append("dws verify failed: " + "; ".join(rep["verify"]["lines"]))
        return bad


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="make demo", description="Run env_space, rollout replicas (vLLM) and the "
                                 "trainer locally on 127.0.0.1 over a local-folder bucket, then report.")
    a = ap.add_argument
    a("--dir", type=Path, default=Path(".dws/demo"), help="work folder: tiny model, bucket, logs (ignored by git)")
    a("--bucket", default=None, help="bucket address (default: <dir>/bucket, a local folder wiped at each run)")
    a("--model", default=None, help="model folder or Hub id (default: the tiny model built in <dir>)")
    a("--steps", type=int, default=DemoOptions.steps)
    a("--lr", type=float, default=DemoOptions.lr)
    a("--optim", default=DemoOptions.optim, help="trainer optimizer (transformers' TrainingArguments.optim)")
    a("--trainable", default=DemoOptions.trainable,
      help="regex of the parameters the trainer updates ('' for all; default: the tied embedding)")
    a("--prompts-per-step", type=int, default=DemoOptions.prompts_per_step)
    a("--group-size", type=int, default=DemoOptions.group_size, help="completions per prompt (GRPO group)")
    a("--task", default=DemoOptions.task, help="env task the trainer learns (short, letter, reverse, wordle)")
    a("--replicas", type=int, default=DemoOptions.replicas)
    a("--late-after", type=int, default=DemoOptions.late_after,
      help="the trainer stops at this version, the last replica joins (from an anchor + deltas), then the trainer "
           "restarts on the bucket and continues while it serves")
    a("--anchor-every", type=int, default=DemoOptions.anchor_every)
    a("--port-base", type=int, default=DemoOptions.port_base,
      help="trainer on this port, env on +1, replicas on +2...; 0 picks free ports")
    a("--exit-when-done", action="store_true", help="stop everything after the summary instead of waiting for Ctrl-C")
    a("--report", type=Path, default=None, help="write the JSON report here")
    a("--venv-root", type=Path, default=DemoOptions.venv_root, help="where the per-Space venvs are")
    a("--no-load", dest="load", action="store_false", help="no background inference load on the replicas")
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    opts = DemoOptions(**vars(ns))
    demo = Demo(opts)
    try:
        report = demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: every service was stopped", file=sys.stderr)
        return 130
    except (LaunchError, httpx.HTTPError) as exc:
        # A service that stops answering mid-run is a failure to report, not a traceback.
        print(f"\ndemo failed: {type(exc).__name__}: {exc}\n(every service was stopped)", file=sys.stderr)
        return 1
    bad = demo.checks(report)
    for b in bad:
        print(f"CHECK FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
