"""Configuration of the trainer Space: one typed dataclass, filled from CLI flags whose defaults come from the
same-named environment variables (Space variables / secrets, DESIGN.md §4).

Owns `TrainerConfig` and `parse_args`. Secrets (`DWS_API_KEY`, `DWS_ROLLOUT_TOKEN`, `DWS_ENV_TOKEN`, `HF_TOKEN`) are
kept out of `describe()` and `repr()` so they never reach a log line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields


def _env(name: str, default=None):
    v = os.environ.get(name)
    return default if v in (None, "") else v


def _bool(v) -> bool:
    return str(v).strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    model: str
    bucket: str
    rollout_urls: tuple[str, ...]
    env_url: str
    task: str = "short"  # one env task, or several comma-separated (rows of each task in every epoch)
    steps: int = 20
    lr: float = 1e-3
    # Any of transformers' TrainingArguments.optim names. "sgd" keeps updates proportional to the gradient, so the
    # tiny demo model learns fast while most bf16 weights stay bit-identical; AdamW moves every weight by ~lr.
    optim: str = "adamw_torch"
    trainable: str | None = None  # regex over parameter names; None trains every weight
    prompts_per_step: int = 2  # distinct prompts per optimizer step
    group_size: int = 4  # completions per prompt (GRPO group)
    max_completion_length: int = 16
    temperature: float = 1.0
    beta: float = 0.0
    num_prompts: int = 64  # prompts drawn from the env task for the dataset
    seed: int = 0
    staleness: int = 1  # max (trainer version - batch version) a batch may have
    stale_wait_s: float = 30.0  # how long to nudge/poll a lagging replica before regenerating anyway
    max_regenerations: int = 4
    overlap: bool = True  # generate the next batch while the current one trains
    prefetch_wait_s: float = 10.0  # how long a prefetch waits for replicas to reach the version it needs
    max_turns: int = 0  # multi-turn tasks: turn limit per episode (0 = the task's own limit)
    max_episode_tokens: int = 1024  # multi-turn tasks: completion + feedback tokens per episode
    fault_nan_at_step: int = 0  # FAULT INJECTION for tests only: poison one weight with NaN after this step
    is_mode: str = "token_truncate"  # TRL's vllm_importance_sampling_mode, applied to remote logprobs
    is_clip_max: float = 3.0
    anchor_every: int = 10
    anchor_fraction: float = 0.5
    keep_anchors: int = 2
    encoding: str = "compact"
    run_id: str | None = None  # owner.json lease: a restart with the same run id continues the bucket at once
    take_over: bool = False  # write to a bucket another live run owns (that run then stops before its next write)
    host: str = "0.0.0.0"
    port: int = 7860
    ui: bool = True
    output_dir: str = "/tmp/dws-trainer"
    request_timeout_s: float = 120.0
    retry_after_s: float = 10.0  # a failing replica is skipped this long
    api_key: str | None = field(default=None, repr=False)  # default bearer for replicas and env
    rollout_token: str | None = field(default=None, repr=False)  # bearer for replicas (inference + POST /sync)
    env_token: str | None = field(default=None, repr=False)  # bearer for the env Space
    hf_token: str | None = field(default=None, repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.task.split(",") if t.strip())

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def describe(self) -> dict:
        """Everything loggable: secrets are reported only as set / unset."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = ("set" if v else "unset") if f.name.endswith(("token", "api_key")) else v
        return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m trainer_space",
                                 description="TRL GRPO over remote rollout replicas; publishes every step to a bucket.")
    a = ap.add_argument
    a("--model", default=_env("DWS_MODEL"), help="base model: Hub id or local folder [DWS_MODEL]")
    a("--bucket", default=_env("DWS_BUCKET"), help="hf://buckets/<ns>/<name>[/prefix] or a folder [DWS_BUCKET]")
    a("--rollout-url", dest="rollout_urls", action="append",
      help="a rollout replica base URL; repeat or comma-separate [DWS_ROLLOUT_URLS]")
    a("--env-url", default=_env("DWS_ENV_URL"), help="env Space base URL [DWS_ENV_URL]")
    a("--task", default=_env("DWS_TASK", "short"),
      help="env task(s), comma-separated; multi-turn tasks (wordle) are played as episodes [DWS_TASK]")
    a("--steps", type=int, default=int(_env("DWS_STEPS", 20)), help="optimizer steps [DWS_STEPS]")
    a("--lr", type=float, default=float(_env("DWS_LR", 1e-3)), help="learning rate [DWS_LR]")
    a("--optim", default=_env("DWS_OPTIM", "adamw_torch"), choices=["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"],
      help="optimizer (transformers' TrainingArguments.optim) [DWS_OPTIM]")
    a("--trainable", default=_env("DWS_TRAINABLE"),
      help="train only parameters whose name matches this regex (default: all) [DWS_TRAINABLE]")
    a("--prompts-per-step", type=int, default=int(_env("DWS_PROMPTS_PER_STEP", 2)), help="[DWS_PROMPTS_PER_STEP]")
    a("--group-size", type=int, default=int(_env("DWS_GROUP_SIZE", 4)), help="completions per prompt [DWS_GROUP_SIZE]")
    a("--max-completion-length", type=int, default=int(_env("DWS_MAX_COMPLETION_LENGTH", 16)))
    a("--temperature", type=float, default=float(_env("DWS_TEMPERATURE", 1.0)))
    a("--beta", type=float, default=float(_env("DWS_BETA", 0.0)), help="KL coefficient [DWS_BETA]")
    a("--num-prompts", type=int, default=int(_env("DWS_NUM_PROMPTS", 64)))
    a("--seed", type=int, default=int(_env("DWS_SEED", 0)))
    a("--staleness", type=int, default=int(_env("DWS_STALENESS", 1)),
      help="max versions a batch may lag the trainer [DWS_STALENESS]")
    a("--stale-wait", dest="stale_wait_s", type=float, default=float(_env("DWS_STALE_WAIT", 30.0)))
    a("--no-overlap", dest="overlap", action="store_false", default=_bool(_env("DWS_OVERLAP", "true")),
      help="generate each batch only when it is needed instead of during the previous step [DWS_OVERLAP=false]")
    a("--prefetch-wait", dest="prefetch_wait_s", type=float, default=float(_env("DWS_PREFETCH_WAIT", 10.0)),
      help="seconds a prefetch waits for the replicas to serve the version it needs [DWS_PREFETCH_WAIT]")
    a("--max-turns", type=int, default=int(_env("DWS_MAX_TURNS", 0)),
      help="multi-turn tasks: turns per episode, 0 = the task's limit [DWS_MAX_TURNS]")
    a("--max-episode-tokens", type=int, default=int(_env("DWS_MAX_EPISODE_TOKENS", 1024)),
      help="multi-turn tasks: completion + feedback tokens per episode [DWS_MAX_EPISODE_TOKENS]")
    a("--fault-nan-at-step", type=int, default=int(_env("DWS_FAULT_NAN_AT_STEP", 0)),
      help="FAULT INJECTION (tests): write NaN into one weight after this optimizer step; the run must stop "
           "before publishing it [DWS_FAULT_NAN_AT_STEP]")
    a("--is-mode", default=_env("DWS_IS_MODE", "token_truncate"),
      choices=["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
    a("--is-clip-max", type=float, default=float(_env("DWS_IS_CLIP_MAX", 3.0)))
    a("--anchor-every", type=int, default=int(_env("DWS_ANCHOR_EVERY", 10)))
    a("--anchor-fraction", type=float, default=float(_env("DWS_ANCHOR_FRACTION", 0.5)))
    a("--keep-anchors", type=int, default=int(_env("DWS_KEEP_ANCHORS", 2)))
    a("--encoding", default=_env("DWS_ENCODING", "compact"), choices=["compact", "raw"])
    a("--run-id", default=_env("DWS_RUN_ID"), help="names this run in the bucket's owner.json lease "
      "(default: SPACE_ID, else host-pid) [DWS_RUN_ID]")
    a("--take-over", action="store_true", default=_bool(_env("DWS_TAKE_OVER", "false")),
      help="take the bucket over from another live trainer instead of refusing [DWS_TAKE_OVER]")
    a("--host", default=_env("HOST", "0.0.0.0"))
    a("--port", type=int, default=int(_env("PORT", 7860)), help="dashboard port [PORT]")
    a("--no-ui", action="store_true", default=not _bool(_env("DWS_UI", "true")), help="no Gradio page at /")
    a("--output-dir", default=_env("DWS_OUTPUT_DIR", "/tmp/dws-trainer"))
    a("--api-key", default=_env("DWS_API_KEY"), help="default bearer for replicas and env [DWS_API_KEY]")
    a("--rollout-token", default=_env("DWS_ROLLOUT_TOKEN"), help="bearer for replicas [DWS_ROLLOUT_TOKEN]")
    a("--env-token", default=_env("DWS_ENV_TOKEN"), help="bearer for the env Space [DWS_ENV_TOKEN]")
    return ap


def parse_args(argv: list[str] | None = None) -> TrainerConfig:
    ap = build_parser()
    ns = ap.parse_args(argv)
    urls = ns.rollout_urls or [_env("DWS_ROLLOUT_URLS", "")]
    rollout_urls = tuple(u.strip().rstrip("/") for s in urls for u in (s or "").split(",") if u.strip())
    missing = [n for n, v in (("--model", ns.model), ("--bucket", ns.bucket), ("--rollout-url", rollout_urls),
                              ("--env-url", ns.env_url)) if not v]
    if missing:
        ap.error("missing " + ", ".join(missing) + " (or the same-named DWS_* environment variables)")
    if ns.trainable:
        import re

        try:
            re.compile(ns.trainable)
        except re.error as e:
            ap.error(f"--trainable {ns.trainable!r} is not a valid regular expression: {e}")
    return TrainerConfig(
        model=ns.model, bucket=ns.bucket, rollout_urls=rollout_urls, env_url=ns.env_url.rstrip("/"), task=ns.task,
        steps=ns.steps, lr=ns.lr, optim=ns.optim, trainable=ns.trainable, prompts_per_step=ns.prompts_per_step, group_size=ns.group_size,
        max_completion_length=ns.max_completion_length, temperature=ns.temperature, beta=ns.beta,
        num_prompts=ns.num_prompts, seed=ns.seed, staleness=ns.staleness, stale_wait_s=ns.stale_wait_s,
        overlap=ns.overlap, prefetch_wait_s=ns.prefetch_wait_s, max_turns=ns.max_turns,
        max_episode_tokens=ns.max_episode_tokens, fault_nan_at_step=ns.fault_nan_at_step,
        is_mode=ns.is_mode, is_clip_max=ns.is_clip_max, anchor_every=ns.anchor_every,
        anchor_fraction=ns.anchor_fraction, keep_anchors=ns.keep_anchors, encoding=ns.encoding, run_id=ns.run_id,
        take_over=ns.take_over, host=ns.host,
        port=ns.port, ui=not ns.no_ui, output_dir=ns.output_dir, api_key=ns.api_key,
        rollout_token=ns.rollout_token or ns.api_key, env_token=ns.env_token or ns.api_key,
        hf_token=_env("HF_TOKEN"))
