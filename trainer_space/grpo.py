"""GRPO with TRL over remote rollouts: the trainer subclass, the rollout function, the staleness guard and the
publishing callback.

Owns:
- `RemoteISGRPOTrainer` -- TRL's `GRPOTrainer` with its *own* importance-sampling correction switched on for logprobs
  that come from remote replicas (the DESIGN.md §4 trap, explained on the class).
- `RemoteRollout` -- the `rollout_func`: token ids + per-token logprobs + `model_version` from the replicas, and the
  staleness guard (a batch whose oldest completion lags the trainer by more than the bound is thrown away, the
  replicas are nudged and polled, and it is regenerated; it is never trained on).
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
from typing import Any

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from shared.publisher import Publisher
from trainer_space.config import TrainerConfig
from trainer_space.remote import EnvScorer, ReplicaPool
from trainer_space.state import BatchRecord, RunState

log = logging.getLogger("dws.trainer")


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
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
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


@dataclass(kw_only=True)
class RolloutTimings:
    generate_s: float = 0.0
    waited_s: float = 0.0


class RemoteRollout:
    """TRL `rollout_func`: completions from the replicas, each tagged with its `model_version`, within the bound."""

    def __init__(self, *, pool: ReplicaPool, tokenizer: Any, state: RunState, config: TrainerConfig,
                 version_of_step: callable) -> None:
        self.pool, self.tok, self.state, self.cfg = pool, tokenizer, state, config
        self.version_of_step = version_of_step  # global_step -> published version of the current weights
        self._ids_cache: dict[str, list[int]] = {}

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids_cache:
            if getattr(self.tok, "chat_template", None):
                text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
            else:
                text = prompt
            self._ids_cache[prompt] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._ids_cache[prompt]

    def _generate(self, prompts: list[str]) -> list:
        # TRL hands over the per-process slice with each prompt repeated num_generations times, consecutively (its
        # RepeatSampler); one request per run of equal prompts with n = run length keeps a group on one replica and
        # returns exactly one completion per input row, in order.
        groups: list[tuple[list[int], int]] = []
        prev = object()
        for p in prompts:
            if p == prev:
                groups[-1] = (groups[-1][0], groups[-1][1] + 1)
            else:
                groups.append((self._prompt_ids(p), 1))
            prev = p
        out = self.pool.complete_many(groups, max_tokens=self.cfg.max_completion_length,
                                      temperature=self.cfg.temperature)
        return [c for g in out for c in g]

    def _wait_for_replicas(self, min_version: int) -> float:
        """Nudge the replicas (POST /sync) and poll /status until one serves >= min_version or time runs out."""
        t0 = time.perf_counter()
        deadline = time.time() + self.cfg.stale_wait_s
        while time.time() < deadline:
            self.pool.nudge()
            served = [v for v in self.pool.served_versions().values() if v is not None]
            if served and max(served) >= min_version:
                break
            time.sleep(0.5)
        return time.perf_counter() - t0

    def __call__(self, prompts: list[str], trainer: GRPOTrainer) -> dict[str, list]:
        step = trainer.state.global_step
        current = self.version_of_step(step)
        rejected: list[int] = []
        waited = gen_s = 0.0
        for attempt in range(1, self.cfg.max_regenerations + 2):
            t0 = time.perf_counter()
            comps = self._generate(prompts)
            gen_s += time.perf_counter() - t0
            versions = [c.model_version for c in comps]
            # A completion without a version tag comes from a replica that cannot say which weights it served:
            # treat it as infinitely stale rather than trust it.
            oldest = min((-10**9 if v is None else v) for v in versions)
            lag = current - oldest
            if lag <= self.cfg.staleness:
                break
            rejected.append(lag)
            log.warning("step %d: batch from v%s lags trainer v%d by %d > bound %d; nudging replicas and "
                        "regenerating (attempt %d)", step + 1, oldest, current, lag, self.cfg.staleness, attempt)
            waited += self._wait_for_replicas(current - self.cfg.staleness)
        else:
            raise StalenessError(f"replicas still serve v{oldest} while the trainer is at v{current} "
                                 f"(bound {self.cfg.staleness}) after {len(rejected)} regenerations; refusing to "
                                 "train on a batch beyond the staleness bound")
        rec = BatchRecord(step=step + 1, trainer_version=current, versions=versions, lag=lag, attempts=attempt,
                          rejected_lags=rejected, waited_s=round(waited, 3), generate_s=round(gen_s, 3),
                          replicas=sorted({c.replica for c in comps}))
        self.state.add_batch(rec)
        self.state.pending(generate_s=gen_s, wait_s=waited, batch_lag=lag)
        return {"prompt_ids": [c.prompt_ids for c in comps],
                "completion_ids": [c.completion_ids for c in comps],
                "logprobs": [c.logprobs for c in comps],
                "model_version": versions}  # extra field: forwarded to the reward function, kept per row


def make_reward_func(scorer: EnvScorer, task: str, state: RunState):
    """Batch reward from the env Space's `/v1/score`; rows carry `prompt_id` from the dataset."""

    def reward(prompts: list[str], completions: list[str], prompt_id: list[str], **_: Any) -> list[float]:
        t0 = time.perf_counter()
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        rewards = scorer.score(task, list(prompt_id), texts)
        state.pending(score_s=time.perf_counter() - t0, reward_mean=sum(rewards) / len(rewards),
                      reward_max=max(rewards))
        return rewards

    reward.__name__ = f"env_{task}"
    return reward


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


def build_dataset(scorer: EnvScorer, cfg: TrainerConfig):
    from datasets import Dataset

    info = scorer.task_info(cfg.task)
    if info.get("multi_turn"):
        log.warning("task %s is multi-turn; it is trained as single-turn (the env scores turn 1)", cfg.task)
    n = min(cfg.num_prompts, int(info.get("num_prompts") or cfg.num_prompts))
    rows = scorer.prompts(cfg.task, n=n, seed=cfg.seed)
    return Dataset.from_list([{"prompt": r["prompt"], "prompt_id": r["prompt_id"]} for r in rows])


def train(cfg: TrainerConfig, *, state: RunState | None = None, nudge_after_publish: bool = True) -> TrainResult:
    """One full run: model, bucket (resume or v0), TRL GRPO with remote rollouts, publish per step, flush."""
    state = state or RunState(cfg.describe())
    log.info("model %s | bucket %s | replicas %s | env %s task %s | steps %d lr %g | batch %d = %d prompts x %d "
             "| staleness bound %d | IS %s clip %.1f", cfg.model, cfg.bucket, ", ".join(cfg.rollout_urls),
             cfg.env_url, cfg.task, cfg.steps, cfg.lr, cfg.batch_size, cfg.prompts_per_step, cfg.group_size,
             cfg.staleness, cfg.is_mode, cfg.is_clip_max)
    model, tok = load_model_and_tokenizer(cfg.model, token=cfg.hf_token)
    state.set(full_bf16_bytes=2 * sum(p.numel() for p in model.parameters()))
    pool = ReplicaPool(cfg.rollout_urls, token=cfg.rollout_token, timeout_s=cfg.request_timeout_s,
                       retry_after_s=cfg.retry_after_s)
    state.set(pool=pool)
    scorer = EnvScorer(cfg.env_url, token=cfg.env_token)
    publisher = Publisher(cfg.bucket, model_name=cfg.model, anchor_every=cfg.anchor_every,
                          anchor_fraction=cfg.anchor_fraction, keep_anchors=cfg.keep_anchors, encoding=cfg.encoding)
    try:
        start = resume_or_init(model, publisher, cfg.bucket, state)
        state.set(start_version=start)
        log.info("starting at version v%d", start)
        dataset = build_dataset(scorer, cfg)
        args = GRPOConfig(
            output_dir=cfg.output_dir, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
            warmup_steps=0, per_device_train_batch_size=cfg.batch_size, num_generations=cfg.group_size,
            gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
            use_vllm=False, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=cfg.is_mode,
            vllm_importance_sampling_clip_max=cfg.is_clip_max, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), bf16=False, seed=cfg.seed, disable_tqdm=True)
        rollout = RemoteRollout(pool=pool, tokenizer=tok, state=state, config=cfg,
                                version_of_step=lambda s: start + s)
        cb = PublishCallback(publisher=publisher, state=state, start_version=start, pool=pool,
                             nudge=nudge_after_publish)
        trainer = RemoteISGRPOTrainer(model=model, reward_funcs=[make_reward_func(scorer, cfg.task, state)],
                                      args=args, train_dataset=dataset, processing_class=tok, rollout_func=rollout,
                                      callbacks=[cb])
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
            publisher.close()
        finally:
            scorer.close()


def reward_curve(state: RunState) -> list[float]:
    return [s.get("reward_mean", math.nan) for s in state.snapshot()["steps"]]
