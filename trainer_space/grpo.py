"""GRPO with TRL over remote rollouts: the trainer subclass, the rollout function, the staleness guard and the
publishing callback.

Owns:
- `RemoteISGRPOTrainer` -- TRL's `GRPOTrainer` with its *own* importance-sampling correction switched on for logprobs
  that come from remote replicas (the docs/design.md §6 trap, explained on the class), reading its rows in the order of
  the run's `PromptSchedule` so that the next batch can be generated ahead.
- `RemoteRollout` -- the `rollout_func`: token ids + per-token logprobs + `model_version` from the replicas
  (single-turn completions or whole multi-turn episodes, see `rollouts.py`), generation of step k+1 overlapping the
  training of step k, and the staleness guard (a batch whose oldest completion lags the trainer by more than the
  bound at the moment it is consumed is thrown away, the replicas are nudged and polled, and it is regenerated; it
  is never trained on).
- `PublishCallback` -- after every optimizer step, publish the weights (version = start version + global step) with
  the shared `Publisher`; upload runs in the background; flush at the end.
- `train(config)` -- the whole run, used by `python -m trainer_space` and by the tests.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from shared.publisher import Publisher
from trainer_space.config import TrainerConfig
from trainer_space.remote import EnvScorer, ReplicaPool
from trainer_space.rollouts import BatchProducer, Prefetcher, PromptSchedule
from trainer_space.state import BatchRecord, RunState

log = logging.getLogger("dws.trainer")


# The version of a completion whose replica could not say which weights served it: older than anything.
_UNTAGGED = -10**9


def _vname(v: int) -> str:
    return "a replica with no version yet" if v == _UNTAGGED else f"v{v}"


class StalenessError(RuntimeError):
    """Replicas stayed beyond the staleness bound after every regeneration; training on the batch is refused."""


class _WeightsGoThroughTheBucket:
    """Stands in for TRL's `VLLMGeneration` where TRL's rollout_func path calls `sync_weights()` when `use_vllm`:
    here the weights reach the replicas only through the bucket (the `PublishCallback`), never by a direct push."""

    def sync_weights(self) -> None:
        return None


class RemoteISGRPOTrainer(GRPOTrainer):
    """`GRPOTrainer` whose importance-sampling correction runs for rollout_func logprobs without TRL's vLLM client.

    In trl 1.16 the correction (`vllm_importance_sampling_correction`: ratio = exp(current-policy logprobs - sampling
    logprobs), truncated/masked per `vllm_importance_sampling_mode`, multiplied into the per-token loss) is gated by
    `self.use_vllm`, and `use_vllm=True` in the config would construct TRL's own vLLM client. So the config keeps
    `use_vllm=False` (nothing vLLM is built) and, after TRL's `__init__`, this class sets the *instance* flag to True.
    With a `rollout_func` the flag then affects only: (a) the correction and its metrics, which is the point, and
    (b) one `self.vllm_generation.sync_weights()` call per step, answered by a no-op because weights travel through
    the bucket. Generation never reaches TRL's vLLM path because `rollout_func` is set (checked below). The loss
    itself is TRL's, untouched.

    Two small hooks serve the rollout function: with a `schedule`, TRL's train sampler is that `PromptSchedule` (same
    layout as TRL's own sampler, fixed in advance so the next step's rows are known), and the rows of the batch being
    generated are kept in `current_rows` (TRL hands `rollout_func` only the prompt texts, which do not identify a
    multi-turn episode: every Wordle prompt reads the same).
    """

    def __init__(self, *args: Any, schedule: PromptSchedule | None = None, **kwargs: Any) -> None:
        self.schedule = schedule
        self.current_rows: list[dict] | None = None
        super().__init__(*args, **kwargs)
        if self.rollout_func is None:
            raise ValueError("RemoteISGRPOTrainer needs a rollout_func: generation must not fall to TRL's vLLM path")
        if self.args.use_vllm:
            raise ValueError("keep use_vllm=False in the config; the correction is enabled on the instance")
        if self.tools:
            raise ValueError("tool calling would reach TRL's vLLM-only branches with the flag set")
        self.use_vllm = True  # enables TRL's IS correction for the sampling logprobs rollout_func returns
        self.vllm_mode = "server"  # never "colocate": no in-process engine exists
        self.vllm_generation = _WeightsGoThroughTheBucket()
        self._last_loaded_step = -1

    def _get_train_sampler(self, dataset=None):
        if self.schedule is not None and (dataset is None or dataset is self.train_dataset):
            return self.schedule
        return super()._get_train_sampler(dataset)

    def _generate_and_score_completions(self, inputs):
        self.current_rows = inputs
        return super()._generate_and_score_completions(inputs)


class RemoteRollout:
    """TRL `rollout_func`: the batch for TRL's rows (prefetched during the previous step when overlap is on),
    checked against the staleness bound when it is consumed, never before.

    A batch whose oldest completion (oldest turn, for episodes) lags the trainer's current version by more than the
    bound is thrown away; the replicas are nudged and polled (bounded) and the batch is regenerated, up to
    `max_regenerations` times, then the run stops with `StalenessError`. After a batch is accepted, the prefetcher
    starts on the next step's rows (known from the `PromptSchedule`), asking for a version the bound will still accept
    when that batch is consumed one optimizer step later.
    """

    def __init__(self, *, producer: BatchProducer, pool: ReplicaPool, state: RunState, config: TrainerConfig,
                 version_of_step: Callable[[int], int], schedule: PromptSchedule, rows: list[dict],
                 prefetcher: Prefetcher | None) -> None:
        self.producer, self.pool, self.state, self.cfg = producer, pool, state, config
        self.version_of_step = version_of_step  # global_step -> published version of the current weights
        self.schedule, self.rows, self.prefetcher = schedule, rows, prefetcher

    def __call__(self, prompts: list, trainer: GRPOTrainer) -> dict[str, list]:
        step = trainer.state.global_step  # optimizer steps done; this batch trains step + 1
        current = self.version_of_step(step)
        bound = self.cfg.staleness
        rows = list(getattr(trainer, "current_rows", None) or [])
        if len(rows) != len(prompts):
            raise RuntimeError(f"rollout_func got {len(prompts)} prompts but {len(rows)} dataset rows")
        t_call = time.perf_counter()
        batch, exposed = (None, 0.0)
        if self.prefetcher is not None:
            batch, exposed = self.prefetcher.take(step + 1, rows)
        prefetched = batch is not None
        rejected: list[int] = []
        waited = wasted = 0.0
        attempt = 0
        while True:
            if batch is None:
                batch = self.producer.produce(rows, min_version=current - bound)
            attempt += 1
            # A completion without a version tag comes from a replica that cannot say which weights it served:
            # treat it as infinitely stale rather than trust it.
            oldest = min((_UNTAGGED if v is None else v) for v in batch.versions)
            lag = current - oldest
            if lag <= bound:
                break
            rejected.append(lag)
            if batch.source == "prefetch":
                wasted += batch.generate_s
            log.warning("step %d: %s batch from %s lags trainer v%d by more than the bound %d; nudging replicas "
                        "and regenerating (attempt %d)", step + 1, batch.source, _vname(oldest), current, bound,
                        attempt)
            if attempt > self.cfg.max_regenerations:
                raise StalenessError(f"batches still come from {_vname(oldest)} while the trainer is at v{current} "
                                     f"(bound {bound}) after {len(rejected)} regenerations; refusing to train on a "
                                     "batch beyond the staleness bound")
            t0 = time.perf_counter()
            self.pool.wait_for_version(current - bound, timeout_s=self.cfg.stale_wait_s)
            waited += time.perf_counter() - t0
            batch = None
        foreground = time.perf_counter() - t_call - waited  # generation the training loop actually waited for
        nxt = self.schedule.rows_for_step(step + 2)
        if self.prefetcher is not None and nxt is not None:
            # Consumed one step from now, when the trainer is at current + 1.
            self.prefetcher.submit(step + 2, [self.rows[i] for i in nxt], min_version=current + 1 - bound)
        # The worker waited for the replicas, then generated; whatever of the generation did not end up in `exposed`
        # (the training loop waiting for it) ran while the previous step trained.
        background = batch.generate_s if batch.source == "prefetch" else 0.0
        hidden = max(0.0, background - exposed)
        episodes = batch.episodes()
        rec = BatchRecord(
            step=step + 1, trainer_version=current, versions=batch.versions, lag=lag, attempts=attempt,
            rejected_lags=rejected, waited_s=round(waited, 3), generate_s=round(foreground, 3),
            replicas=sorted({r for smp in batch.samples for r in smp.replicas}), source=batch.source,
            prefetched=prefetched, exposed_wait_s=round(exposed, 3), prefetch_generate_s=round(background, 3),
            prefetch_replica_wait_s=round(batch.replica_wait_s, 3),
            hidden_s=round(hidden, 3), wasted_s=round(wasted, 3), tasks=sorted({r.get("task") for r in rows}),
            turns=[smp.turns for smp in episodes], episode_returns=[round(smp.env_return, 4) for smp in episodes])
        self.state.add_batch(rec)
        pend = dict(generate_s=foreground, wait_s=waited, hidden_generate_s=hidden, batch_lag=lag,
                    batch_source=batch.source)
        if episodes:
            pend.update(episodes=len(episodes), turns_mean=sum(e.turns for e in episodes) / len(episodes),
                        turns_max=max(e.turns for e in episodes))
        self.state.pending(**pend)
        out = {"prompt_ids": [smp.prompt_ids for smp in batch.samples],
               "completion_ids": [smp.completion_ids for smp in batch.samples],
               "logprobs": [smp.logprobs for smp in batch.samples],
               # extra fields: forwarded per row to the reward function
               "model_version": batch.versions,
               "env_return": [smp.env_return for smp in batch.samples]}
        if episodes:
            out["env_mask"] = [smp.env_mask for smp in batch.samples]  # TRL: 0 = env tokens, not trained
        return out


def make_reward_func(scorer: EnvScorer, state: RunState, multi_turn: set[str]):
    """Per row: the episode return for multi-turn tasks (played in the rollout), the env Space's batch `/v1/score`
    for single-turn ones (rows carry `prompt_id` and `task` from the dataset)."""

    def env_reward(prompts: list, completions: list, prompt_id: list[str], task: list[str],
                   env_return: list[float | None] | None = None, **_: Any) -> list[float]:
        t0 = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        out: list[float | None] = [None] * len(texts)
        single: dict[str, list[int]] = {}
        for i, t in enumerate(task):
            if t in multi_turn:
                if env_return is None or env_return[i] is None:
                    raise RuntimeError(f"row {i} of multi-turn task {t} has no episode return")
                out[i] = float(env_return[i])
            else:
                single.setdefault(t, []).append(i)
        for t, idx in single.items():
            for i, r in zip(idx, scorer.score(t, [prompt_id[i] for i in idx], [texts[i] for i in idx]), strict=True):
                out[i] = r
        by_task = {t: sum(out[i] for i in range(len(out)) if task[i] == t) / task.count(t) for t in sorted(set(task))}
        state.pending(score_s=time.perf_counter() - t0, reward_mean=sum(out) / len(out), reward_max=max(out),
                      reward_by_task=by_task)
        return out

    return env_reward


class FaultInjection(TrainerCallback):
    """FAULT INJECTION, for tests of the NaN/Inf refusal (`--fault-nan-at-step`): after optimizer step `at`, one
    element of the first weight becomes NaN, exactly what a diverged update leaves behind. The publishing callback
    runs after this one and must refuse to publish; nothing else is changed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            name, p = next(iter(model.named_parameters()))
            with torch.no_grad():
                p.view(-1)[0] = float("nan")
            log.warning("FAULT INJECTION: wrote NaN into %s after step %d", name, self.at)


class PublishCallback(TrainerCallback):
    """Publishes after each optimizer step; records step timings and TRL's logged figures into the RunState."""

    def __init__(self, *, publisher: Publisher, state: RunState, start_version: int,
                 pool: ReplicaPool | None, nudge: bool) -> None:
        self.pub, self.state, self.start_version = publisher, state, start_version
        self.pool, self.nudge = pool, nudge
        self._t_step = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t_step = time.perf_counter()

    def _on_published(self, fut) -> None:
        try:
            rep = fut.result()
        except Exception as e:  # surfaced again by the next publish()/flush(); keep it visible on the dashboard
            self.state.set(error=f"publish failed: {e}")
            return
        d = rep.as_dict()
        self.state.add_publish(d)
        log.info("published v%d %s: changed %d/%d (sparsity %.4f), %d bytes, encode %.3fs, upload %.3fs",
                 rep.version, "+".join(rep.kinds), rep.changed, rep.total, rep.sparsity, rep.bytes, rep.encode_s,
                 rep.upload_s)
        if self.nudge and self.pool is not None:
            threading.Thread(target=self.pool.nudge, daemon=True).start()

    def publish(self, model: torch.nn.Module, version: int) -> float:
        t0 = time.perf_counter()
        fut = self.pub.publish(model.named_parameters(), version)  # NonFiniteWeightsError stops the run here
        block = time.perf_counter() - t0
        fut.add_done_callback(self._on_published)
        return block

    def on_step_end(self, args, state, control, model=None, **kw):
        step_s = time.perf_counter() - self._t_step
        version = self.start_version + state.global_step
        block = self.publish(model, version)
        self.state.end_step({"step": state.global_step, "version": version, "step_s": step_s,
                             "publish_block_s": block, "t": time.time()})

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        keep = {"loss": "loss", "kl": "kl", "reward": "reward_trl", "entropy": "entropy",
                "sampling/importance_sampling_ratio/mean": "is_ratio_mean",
                "sampling/importance_sampling_ratio/min": "is_ratio_min",
                "sampling/importance_sampling_ratio/max": "is_ratio_max",
                "sampling/sampling_logp_difference/mean": "logp_diff_mean"}
        row = {v: float(logs[k]) for k, v in keep.items() if k in logs and logs[k] is not None}
        self.state.update_step(state.global_step, **row)

    def on_train_end(self, args, state, control, **kw):
        self.pub.flush()


@dataclass(kw_only=True)
class TrainResult:
    start_version: int
    final_version: int
    model: torch.nn.Module
    state: RunState
    trainer: Any = None
    extra: dict = field(default_factory=dict)

    def final_bf16(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to(torch.bfloat16).clone() for n, p in self.model.named_parameters()}


def load_model_and_tokenizer(model_id: str, *, token: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_id, token=token)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # fp32 master weights: the published bf16 copy is a cast of these (updates below a bf16 ulp accumulate here).
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, token=token)
    return model, tok


def freeze_except(model: torch.nn.Module, pattern: str) -> list[str]:
    """Train only the parameters whose name matches `pattern` (re.search); the rest keep requires_grad=False.
    Frozen weights never change, so they never appear in a delta. Raises ValueError when nothing matches -- a typo
    would otherwise train nothing and publish empty deltas for the whole run."""
    import re

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


def resume_or_init(model: torch.nn.Module, publisher: Publisher, bucket: str, state: RunState) -> int:
    """Start version: restore the bucket's latest weights into the model (restart), or publish v0 (empty bucket)."""
    latest = publisher.latest_version
    if latest is None:
        publisher.publish(model.named_parameters(), 0)
        publisher.flush()
        state.add_publish(publisher.reports[-1].as_dict())
        log.info("bucket was empty: published the initial weights as v0")
        return 0
    from shared.follower import Follower

    version, sd = Follower(bucket).materialize()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    if missing:
        raise RuntimeError(f"bucket v{version} lacks tensors the model has: {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(sd[name].to(p.dtype))
    log.info("bucket already holds versions up to v%d: restored them into the model; continuing at v%d",
             version, version + 1)
    return version


def build_dataset(scorer: EnvScorer, cfg: TrainerConfig) -> tuple[Any, dict[str, dict]]:
    """Prompts of every task (an equal share of `num_prompts` each) with their stable ids; and the tasks' infos."""
    from datasets import Dataset

    infos = {t: scorer.task_info(t) for t in cfg.tasks}
    share = max(1, cfg.num_prompts // len(cfg.tasks))
    rows = []
    for t, info in infos.items():
        n = min(share, int(info.get("num_prompts") or share))
        rows += [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "task": t}
                 for r in scorer.prompts(t, n=n, seed=cfg.seed)]
    return Dataset.from_list(rows), infos


def train(cfg: TrainerConfig, *, state: RunState | None = None, nudge_after_publish: bool = True) -> TrainResult:
    """One full run: model, bucket (resume or v0), TRL GRPO with remote rollouts, publish per step, flush."""
    state = state or RunState(cfg.describe())
    overlap = cfg.overlap and cfg.staleness >= 1
    if cfg.overlap and not overlap:
        log.warning("staleness bound 0: a batch made during the previous step could never be used; overlap is off")
    log.info("model %s | bucket %s | replicas %s | env %s task %s | steps %d lr %g | batch %d = %d prompts x %d "
             "| staleness bound %d | overlap %s | IS %s clip %.1f", cfg.model, cfg.bucket, ", ".join(cfg.rollout_urls),
             cfg.env_url, cfg.task, cfg.steps, cfg.lr, cfg.batch_size, cfg.prompts_per_step, cfg.group_size,
             cfg.staleness, "on" if overlap else "off", cfg.is_mode, cfg.is_clip_max)
    model, tok = load_model_and_tokenizer(cfg.model, token=cfg.hf_token)
    if cfg.trainable:
        freeze_except(model, cfg.trainable)
    state.set(full_bf16_bytes=2 * sum(p.numel() for p in model.parameters()), overlap=overlap)
    pool = ReplicaPool(cfg.rollout_urls, token=cfg.rollout_token, timeout_s=cfg.request_timeout_s,
                       retry_after_s=cfg.retry_after_s)
    state.set(pool=pool)
    scorer = EnvScorer(cfg.env_url, token=cfg.env_token)
    publisher = Publisher(cfg.bucket, model_name=cfg.model, anchor_every=cfg.anchor_every,
                          anchor_fraction=cfg.anchor_fraction, keep_anchors=cfg.keep_anchors, encoding=cfg.encoding,
                          run_id=cfg.run_id, take_over=cfg.take_over)
    producer = prefetcher = None
    try:
        start = resume_or_init(model, publisher, cfg.bucket, state)
        state.set(start_version=start)
        log.info("starting at version v%d", start)
        dataset, infos = build_dataset(scorer, cfg)
        multi_turn = {t for t, info in infos.items() if info.get("multi_turn")}
        state.set(tasks=list(cfg.tasks), multi_turn_tasks=sorted(multi_turn))
        args = GRPOConfig(
            output_dir=cfg.output_dir, max_steps=cfg.steps, learning_rate=cfg.lr, optim=cfg.optim,
            lr_scheduler_type="constant",
            warmup_steps=0, per_device_train_batch_size=cfg.batch_size, num_generations=cfg.group_size,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
            use_vllm=False, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=cfg.is_mode,
            vllm_importance_sampling_clip_max=cfg.is_clip_max, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), bf16=False, seed=cfg.seed, disable_tqdm=True)
        schedule = PromptSchedule(len(dataset), prompts_per_step=cfg.prompts_per_step, group_size=cfg.group_size,
                                  steps=cfg.steps, seed=cfg.seed)
        producer = BatchProducer(pool=pool, tokenizer=tok, env_url=cfg.env_url, env_token=cfg.env_token,
                                 multi_turn=multi_turn, group_size=cfg.group_size,
                                 max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                 max_turns=cfg.max_turns, max_episode_tokens=cfg.max_episode_tokens,
                                 task_max_turns={t: int(i.get("max_turns") or 1) for t, i in infos.items()})
        prefetcher = Prefetcher(producer, pool, wait_s=cfg.prefetch_wait_s) if overlap else None
        rollout = RemoteRollout(producer=producer, pool=pool, state=state, config=cfg,
                                version_of_step=lambda s: start + s, schedule=schedule, rows=dataset.to_list(),
                                prefetcher=prefetcher)
        callbacks: list[TrainerCallback] = []
        if cfg.fault_nan_at_step > 0:
            callbacks.append(FaultInjection(cfg.fault_nan_at_step))  # before publishing: it must be caught there
        callbacks.append(PublishCallback(publisher=publisher, state=state, start_version=start, pool=pool,
                                         nudge=nudge_after_publish))
        trainer = RemoteISGRPOTrainer(model=model, reward_funcs=[make_reward_func(scorer, state, multi_turn)],
                                      args=args, train_dataset=dataset, processing_class=tok, rollout_func=rollout,
                                      callbacks=callbacks, schedule=schedule)
        state.set(phase="training")
        trainer.train()
        publisher.flush()
        state.set(phase="done")
        final = start + trainer.state.global_step
        log.info("done: v%d..v%d published; latest in bucket v%s", start, final, publisher.latest_version)
        return TrainResult(start_version=start, final_version=final, model=model, state=state, trainer=trainer)
    except Exception as e:
        state.set(phase="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        try:
            if prefetcher is not None:
                prefetcher.close()
            if producer is not None:
                producer.close()
            publisher.close()
        finally:
            scorer.close()


def reward_curve(state: RunState) -> list[float]:
    return [s.get("reward_mean", math.nan) for s in state.snapshot()["steps"]]
