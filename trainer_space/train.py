"""One training run: TRL's `AsyncGRPOTrainer` with this system's two extension points plugged in.

Owns `train(config)` (used by `python -m trainer_space` and the tests): open the replica and env pools and the
publisher (owner lease), build the dataset from the env Spaces' prompts, build the trainer with
`rollout_worker=RemoteRolloutWorker` (worker.py) and `weight_transfer=BucketWeightTransfer` (transfer.py), restore
the bucket's latest version into the model on a restart, train, flush. TRL owns the loss, batching, staleness drops
and metrics; nothing here reaches into its private state. The one attribute set on the trainer is its public
`model_version` (TRL restores it itself when resuming a checkpoint), so that TRL's versions are the bucket's.
Under torchrun (WORLD_SIZE > 1) the same function runs on every rank, sharded with FSDP2; what differs -- and the one
TRL method overridden there, the weight-sync iterator -- is in trainer_space/sharded.py.

Also owns `StepRecorder` (TRL's logged figures -> one dashboard row per optimizer step) and `FaultInjection`, a test
hook driven by the environment variable `DWS_TEST_FAULT_NAN_AT_STEP`, not by a flag.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from shared.envvars import env_value
from shared.publisher import Publisher
from trainer_space.config import FAULT_NAN_VAR, TrainerConfig
from trainer_space.remote import EnvPool, ReplicaPool
from trainer_space.rollouts import GroupPlayer, TurnTemplate
from trainer_space.state import RunState
from trainer_space.transfer import BucketWeightTransfer
from trainer_space.worker import RemoteRolloutWorker, make_executor

log = logging.getLogger("dws.trainer")

# TRL's logged key -> the dashboard row's key
_LOGGED = {"loss": "loss", "reward": "reward_mean", "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
           "ratio": "ratio_mean", "clip_ratio/region_mean": "clip_ratio", "grad_norm": "grad_norm",
           "sample/staleness_mean": "staleness_mean", "sample/staleness_max": "staleness_max",
           "sample/dropped_stale_total": "dropped_stale", "sample/rollout_queue_size": "queue_size",
           "sample/time_in_queue_s": "time_in_queue_s", "perf/rollout_wait_s": "rollout_wait_s",
           "perf/step_s": "trl_step_s", "perf/fwd_bwd_s": "fwd_bwd_s", "perf/optimizer_s": "optimizer_s",
           "perf/weight_sync_s": "publish_block_s", "batch/samples_per_step": "samples",
           "rollout/generate_s": "generate_s", "rollout/score_s": "score_s", "episode/turns": "turns_mean"}


class StepRecorder(TrainerCallback):
    """One row per optimizer step from what TRL logs (logging_steps=1), plus the published version and wall time."""

    def __init__(self, *, state: RunState, transfer: BucketWeightTransfer, tasks: tuple[str, ...]) -> None:
        self.state, self.transfer, self.tasks = state, transfer, tasks
        self._t_prev: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        self._t_prev = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        now = time.time()
        row: dict[str, Any] = {"step": state.global_step, "version": self.transfer.last_version, "t": now,
                               "step_s": now - (self._t_prev or now)}
        self._t_prev = now
        for k, v in _LOGGED.items():
            if logs.get(k) is not None:
                row[v] = float(logs[k])
        row["reward_by_task"] = {t: float(logs[f"rewards/{t}"]) for t in self.tasks
                                 if logs.get(f"rewards/{t}") is not None}
        # Time the step spent training: forward/backward + optimizer; publish is the blocking snapshot.
        row["train_s"] = row.get("fwd_bwd_s", 0.0) + row.get("optimizer_s", 0.0)
        self.state.add_step(row)
        log.info("step %d -> v%s | reward %.3f | loss %.4f | %.2fs (waiting for rollouts %.2fs) | staleness %.2f "
                 "(max %d), %d dropped as stale | queue %.0f", row["step"], row["version"],
                 row.get("reward_mean", float("nan")), row.get("loss", float("nan")), row["step_s"],
                 row.get("rollout_wait_s", 0.0), row.get("staleness_mean", float("nan")),
                 row.get("staleness_max", 0), row.get("dropped_stale", 0), row.get("queue_size", 0))


class FaultInjection(TrainerCallback):
    """FAULT INJECTION, for tests of the NaN/Inf refusal (`DWS_TEST_FAULT_NAN_AT_STEP`): after optimizer step `at`,
    one element of the first trainable weight becomes NaN, exactly what a diverged update leaves behind. It runs
    before TRL's weight-sync callback (callbacks given to the constructor come first), so the publish of that step
    must refuse it; nothing else is changed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            name, p = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
            local = p.to_local() if hasattr(p, "to_local") else p  # sharded: this rank's rows (rank 0: element 0)
            if local.numel() == 0:
                return
            with torch.no_grad():
                local.view(-1)[0] = float("nan")
            log.warning("FAULT INJECTION: wrote NaN into %s after step %d", name, self.at)


@dataclass(kw_only=True)
class TrainResult:
    start_version: int
    final_version: int
    model: torch.nn.Module
    state: RunState
    trainer: Any = None

    def final_bf16(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(torch.bfloat16).clone() for n, p in self.model.named_parameters()}


def freeze_except(model: torch.nn.Module, pattern: str) -> list[str]:
    """Train only the parameters whose name matches `pattern` (re.search); the rest keep requires_grad=False.
    Frozen weights never change, so they never appear in a delta. Raises ValueError when nothing matches -- a typo
    would otherwise train nothing and publish empty deltas for the whole run."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--trainable {pattern!r} is not a valid regular expression: {e}") from None
    names = [n for n, _ in model.named_parameters()]
    keep = [n for n in names if rx.search(n)]
    if not keep:
        raise ValueError(f"--trainable {pattern!r} matches no parameter; names look like {names[:3]}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    n_keep = sum(p.numel() for n, p in model.named_parameters() if n in keep)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("training %d of %d tensors (%.1f%% of the weights) matching %r", len(keep), len(names),
             100 * n_keep / n_all, pattern)
    return keep


def restore_latest(model: torch.nn.Module, bucket: str, *, token: str | None) -> int:
    """Copy the bucket's latest version into the model (a restart); returns that version."""
    from shared.follower import Follower

    version, sd = Follower(bucket, token=token).materialize()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    if missing:
        raise RuntimeError(f"bucket v{version} lacks tensors the model has: {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name].to(p.dtype))
    return version


def build_rows(envs: EnvPool, cfg: TrainerConfig) -> tuple[list[dict], dict]:
    """Prompts of every task (an equal share of `num_prompts` each) with their stable ids; and the tasks' infos."""
    infos = {t: envs.task_info(t) for t in cfg.tasks}
    share = max(1, cfg.num_prompts // len(cfg.tasks))
    rows = []
    for t, info in infos.items():
        n = min(share, info.num_prompts or share)
        rows += [{"prompt": p.prompt, "prompt_id": p.prompt_id, "task": t} for p in envs.prompts(t, n=n, seed=cfg.seed)]
    return rows, infos


def _trainer_args(cfg: TrainerConfig, *, world: int = 1):
    from trl.experimental.async_grpo import AsyncGRPOConfig

    cuda = torch.cuda.is_available()
    return AsyncGRPOConfig(
        output_dir=cfg.output_dir, max_steps=cfg.steps, learning_rate=cfg.lr, optim=cfg.optim,
        # TRL's micro-batch is per_device_train_batch_size x ranks samples, split row by row over the ranks: the
        # batch per optimizer step stays `batch_size` whatever the rank count (config refuses one that does not split).
        lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=cfg.batch_size // world,
        gradient_accumulation_steps=1, num_generations=cfg.group_size,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        # <= 0: a fixed count of samples (one batch) per micro-batch. None would ask TRL's own vLLM client for the
        # server's max_model_len; the replicas here are reached only through the rollout worker.
        token_budget=0, max_staleness=cfg.max_staleness, weight_sync_steps=cfg.weight_sync_steps,
        max_inflight_tasks=cfg.inflight, queue_maxsize=cfg.buffer_size,
        heartbeat_stale_after_s=cfg.rollout_timeout_s, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not cuda, bf16=cuda, gradient_checkpointing=False, seed=cfg.seed, disable_tqdm=True,
        dtype="float32", model_init_kwargs={"token": cfg.hf_token} if cfg.hf_token else None)


def _open_publisher(cfg: TrainerConfig, ranks):
    """The single-process Publisher, or under torchrun this rank's ShardedPublisher (a collective: every rank)."""
    if not ranks.sharded:
        return Publisher(cfg.bucket, model_name=cfg.model, anchor_every=cfg.anchor_every,
                         anchor_fraction=cfg.anchor_fraction, keep_anchors=cfg.keep_anchors,
                         encoding=cfg.encoding, run_id=cfg.run_id, take_over=cfg.take_over, token=cfg.hf_token)
    from shared.bucket import open_bucket
    from shared.sharded import ShardedPublisher
    from trainer_space.sharded import killing_bucket

    bucket = killing_bucket(open_bucket(cfg.bucket, token=cfg.hf_token, create=True), ranks)
    return ShardedPublisher(bucket, model_name=cfg.model, anchor_every=cfg.anchor_every,
                            anchor_fraction=cfg.anchor_fraction, keep_anchors=cfg.keep_anchors, encoding=cfg.encoding,
                            run_id=cfg.run_id, take_over=cfg.take_over, token=cfg.hf_token,
                            commit_timeout_s=cfg.rollout_timeout_s)


def publish_row(rep) -> dict:
    """One dashboard row per committed version. A sharded rank 0 reports the whole version (every rank's part)."""
    d = rep.as_dict()
    if d.get("version_total") is None:
        return d
    changed, total = d["version_changed"], d["version_total"]
    return {**d, "changed": changed, "total": total, "sparsity": 1.0 - changed / total if total else 1.0,
            "bytes": (d["delta_bytes"] or 0) + (d["anchor_bytes"] or 0)}


def train(cfg: TrainerConfig, *, state: RunState | None = None,
          callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """One full run: pools, publisher (resume or start at v0), AsyncGRPOTrainer, publish per sync, flush.
    `callbacks` are added after this module's own and before TRL's weight-sync callback.

    Under torchrun (WORLD_SIZE > 1) the same run is sharded (trainer_space/sharded.py): rank 0 alone reaches the
    replicas and env Spaces, every rank trains its FSDP2 shard and publishes its own part of each version."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    from trainer_space.cpu_shims import install_after_build, peak_flops_without_cuda
    from trainer_space.sharded import Ranks

    ranks = Ranks.from_env()
    state = state or RunState(cfg.describe())
    if ranks.main:
        log.info("model %s | bucket %s | replicas %s | env %s task %s | steps %d lr %g | batch %d = %d prompts x %d "
                 "| max staleness %d | %d in flight | sync every %d step(s)%s", cfg.model, cfg.bucket,
                 ", ".join(cfg.rollout_urls), ", ".join(cfg.env_urls), cfg.task, cfg.steps, cfg.lr, cfg.batch_size,
                 cfg.prompts_per_step, cfg.group_size, cfg.max_staleness, cfg.inflight, cfg.weight_sync_steps,
                 f" | FSDP2 over {ranks.world} ranks" if ranks.sharded else "")
    group = None
    if ranks.sharded:
        from trainer_space.sharded import start_process_group

        group = start_process_group(ranks)
    pool = envs = None
    if ranks.main:  # only rank 0 generates and scores (TRL's rollout worker lives on the main process)
        pool = ReplicaPool(cfg.rollout_urls, token=cfg.rollout_token, timeout_s=cfg.request_timeout_s,
                           retry_after_s=cfg.retry_after_s)
        envs = EnvPool(cfg.env_urls, token=cfg.env_token, timeout_s=cfg.request_timeout_s,
                       retry_after_s=cfg.retry_after_s)
        state.set(pool=pool, envs=envs)
    publisher = None
    try:
        publisher = _open_publisher(cfg, ranks)
        rows = infos = None
        if ranks.main:
            try:
                rows, infos = build_rows(envs, cfg)
            except Exception as e:
                if not ranks.sharded:
                    raise
                rows = e  # the other ranks must hear it rather than wait in the broadcast below
        if ranks.sharded:
            from trainer_space.sharded import broadcast

            rows = broadcast(rows, group)
            if isinstance(rows, Exception):
                raise rows
        multi_turn = {t for t, info in (infos or {}).items() if info.max_turns > 1}
        state.set(tasks=list(cfg.tasks), multi_turn_tasks=sorted(multi_turn))
        tok = AutoTokenizer.from_pretrained(cfg.model, token=cfg.hf_token)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        worker = None
        if ranks.main:
            player = GroupPlayer(pool=pool, envs=envs, template=TurnTemplate(tok),
                                 executor=make_executor(cfg.inflight, cfg.group_size), env_token=cfg.env_token,
                                 group_size=cfg.group_size, max_tokens=cfg.max_completion_length,
                                 temperature=cfg.temperature, multi_turn=multi_turn,
                                 task_max_turns={t: i.max_turns for t, i in infos.items()}, max_turns=cfg.max_turns,
                                 max_episode_tokens=cfg.max_episode_tokens)
            worker = RemoteRolloutWorker(player=player, rows=rows, max_inflight=cfg.inflight,
                                         queue_size=cfg.buffer_size, max_staleness=cfg.max_staleness, seed=cfg.seed)
            state.set(worker=worker)

        def published(rep) -> None:
            state.add_publish(publish_row(rep))
            threading.Thread(target=pool.nudge, daemon=True).start()  # replicas look now, not at their next poll

        def failed(e: BaseException) -> None:
            state.set(error=f"publish failed: {e}")

        latest = publisher.latest_version
        start = 0 if latest is None else latest
        transfer = BucketWeightTransfer(publisher, first_version=start, on_published=published if ranks.main else None,
                                        on_failed=failed, rank=ranks.rank if ranks.sharded else None)
        extra, callbacks = list(callbacks or []), []
        fault_at = env_value(FAULT_NAN_VAR, 0, int)
        if fault_at > 0:
            callbacks.append(FaultInjection(fault_at))  # before TRL's sync callback: the publish must catch it
        if ranks.main:
            callbacks.append(StepRecorder(state=state, transfer=transfer, tasks=cfg.tasks))
        callbacks += extra
        trainer_cls = AsyncGRPOTrainer
        if ranks.sharded:
            from trainer_space.sharded import sharded_trainer_class

            trainer_cls = sharded_trainer_class()
        with peak_flops_without_cuda():
            trainer = trainer_cls(model=cfg.model, args=_trainer_args(cfg, world=ranks.world),
                                  train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=callbacks,
                                  rollout_worker=worker, weight_transfer=transfer)
        install_after_build()
        # TRL's PrinterCallback prints every logged dict (~50 keys) per step; StepRecorder logs one line instead.
        trainer.remove_callback(PrinterCallback)
        model = trainer.model
        if cfg.trainable:
            freeze_except(model, cfg.trainable)
        if ranks.sharded:
            from trainer_space.sharded import load_rows, shard_model

            shard_model(model, ranks)
            trainer.dws_transfer = transfer
            if latest is not None:
                rows_now = publisher.restored_rows()
                if rows_now is None:
                    # The history could not be rebuilt row by row (the publisher said why; its next version is an
                    # anchor). The weights must still continue from the bucket: each rank rebuilds the whole model
                    # once, at start, and keeps its rows.
                    from shared.follower import Follower
                    from shared.parts import rows_of

                    log.warning("rank %d: rebuilding the whole of v%d to take its rows from it", ranks.rank, latest)
                    _, full = Follower(cfg.bucket, token=cfg.hf_token).materialize()
                    rows_now = {}
                    for n, t in full.items():
                        r0, r1 = rows_of(tuple(t.shape), ranks.rank, ranks.world)
                        rows_now[n] = t[r0:r1].clone()
                    del full
                load_rows(model, rows_now)
                log.info("rank %d: restored its rows of v%d from the bucket; continuing at v%d", ranks.rank, latest,
                         latest + 1)
        elif latest is not None:
            restore_latest(model, cfg.bucket, token=cfg.hf_token)
            log.info("bucket already holds versions up to v%d: restored them into the model; continuing at v%d",
                     latest, latest + 1)
        if latest is None and ranks.main:
            log.info("bucket is empty: the initial weights become v0")
        # Sharded, the sync hands every parameter (frozen ones included) to the transfer, so none are added.
        transfer.frozen = {} if ranks.sharded else {n: p for n, p in model.named_parameters() if not p.requires_grad}
        transfer.names = [n for n, _ in model.named_parameters()]
        # TRL raises its version by one per sync, the first (cold) sync included: starting one below makes the
        # version after that sync the bucket's `start`, so replica tags and TRL's staleness share their numbers.
        trainer.model_version = start - 1
        state.set(full_bf16_bytes=2 * sum(p.numel() for p in model.parameters()), start_version=start,
                  phase="training")
        log.info("starting at version v%d", start)
        # What exists now (torch, transformers, TRL, datasets, the model's modules: ~430 k objects) lives for the
        # whole run. Out of the collector's sight, a full collection -- it holds the GIL, stalling the training loop
        # and the publisher's thread alike -- scans only what the run makes: measured 360-390 ms per full collection
        # of this process's start-up heap, ~0 frozen. (Unfrozen when the run ends.)
        gc.collect()
        gc.freeze()
        trainer.train()
        if cfg.steps % cfg.weight_sync_steps:
            # TRL syncs every weight_sync_steps steps: the last steps of the run are not yet in the bucket.
            transfer.publish_now(model.named_parameters())
        publisher.flush()
        if transfer.error is not None:
            raise transfer.error
        final = transfer.last_version
        state.set(phase="done")
        if ranks.main:
            log.info("done: v%d..v%d; latest in bucket v%s; %s", start, final, publisher.latest_version,
                     {k: v for k, v in worker.snapshot().items() if k in ("groups", "samples", "waiting_for_fresh_s")})
        else:
            log.info("done: v%d..v%d; this rank's parts are stored (rank 0 commits each version)", start, final)
        return TrainResult(start_version=start, final_version=final, model=model, state=state, trainer=trainer)
    except Exception as e:
        state.set(phase="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        gc.unfreeze()  # a later run in this process must not keep this one's objects out of the collector
        try:
            if publisher is not None:
                publisher.close()
        finally:
            if pool is not None:
                pool.close()
            if envs is not None:
                envs.close()
