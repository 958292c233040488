"""Configuration of the trainer Space: one typed dataclass, filled from CLI flags whose defaults come from the
same-named environment variables (Space variables / secrets, docs/design.md §6).

Owns `TrainerConfig`, the flag table (`build_parser`: every flag names its variable in `--help`) and `parse_args`.
Variables are read through `shared.envvars`, so a typo in a boolean or a number stops the command with one line
naming the variable instead of silently reading as a default. Secrets (`DWS_API_KEY`, `DWS_ROLLOUT_TOKEN`,
`DWS_ENV_TOKEN`, `HF_TOKEN`) are kept out of `describe()` and `repr()` so they never reach a log line.

Test hooks are not flags: `DWS_TEST_FAULT_NAN_AT_STEP` (see `train.FaultInjection`) is read from the environment only.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from shared.envvars import EnvVarError, env_bool, env_str, env_value, help_env

#: FAULT INJECTION for tests only: NaN is written into one weight after this optimizer step (0 = off).
FAULT_NAN_VAR = "DWS_TEST_FAULT_NAN_AT_STEP"


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    model: str
    bucket: str
    rollout_urls: tuple[str, ...]
    env_urls: tuple[str, ...]
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
    epsilon: float = 0.2  # PPO-style clip of the ratio current / sampling policy (TRL's AsyncGRPO loss)
    epsilon_high: float | None = None
    num_prompts: int = 64  # prompts drawn from the env task for the dataset
    seed: int = 0
    max_staleness: int = 1  # TRL drops a sample whose version lags the trainer's by more than this
    weight_sync_steps: int = 1  # optimizer steps per published version
    max_inflight: int = 0  # generation requests in flight across the replicas; 0 = prompts per step
    queue_size: int = 0  # scored samples buffered for the trainer; 0 = max_staleness batches (generation waits)
    max_turns: int = 0  # multi-turn tasks: turn limit per episode (0 = the task's own limit)
    max_episode_tokens: int = 1024  # multi-turn tasks: completion + feedback tokens per episode
    anchor_every: int = 10
    anchor_fraction: float = 0.5
    keep_anchors: int = 2
    encoding: str = "compact"
    run_id: str | None = None  # owner.json lease: a restart with the same run id continues the bucket at once
    take_over: bool = False  # write to a bucket another live run owns (that run then stops before its next write)
    host: str = "0.0.0.0"
    port: int = 7860
    ui: bool = True
    exit_when_done: bool = True  # default: exit outside a Space, keep serving the dashboard inside one
    output_dir: str = "/tmp/dws-trainer"
    request_timeout_s: float = 120.0
    retry_after_s: float = 10.0  # a failing replica or env Space is skipped this long
    rollout_timeout_s: float = 300.0  # no replica / no env answering this long stops the run
    api_key: str | None = field(default=None, repr=False)  # default bearer for replicas and env
    rollout_token: str | None = field(default=None, repr=False)  # bearer for replicas (inference + POST /sync)
    env_token: str | None = field(default=None, repr=False)  # bearer for the env Spaces
    hf_token: str | None = field(default=None, repr=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.task.split(",") if t.strip())

    @property
    def env_url(self) -> str:
        """The first env Space (prompts are read from it; scoring goes round-robin over all of them)."""
        return self.env_urls[0]

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    @property
    def inflight(self) -> int:
        return self.max_inflight or self.prompts_per_step

    @property
    def buffer_size(self) -> int:
        # Samples queued beyond what the staleness bound lets the trainer use are generated only to be dropped.
        return self.queue_size or self.batch_size * max(1, self.max_staleness)

    def describe(self) -> dict:
        """Everything loggable: secrets are reported only as set / unset."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = ("set" if v else "unset") if f.name.endswith(("token", "api_key")) else v
        return out


def _urls(values: list[str] | None, var: str) -> tuple[str, ...]:
    """Repeated flags and/or comma-separated lists -> base URLs without a trailing slash."""
    raw = values or [env_str(var, "")]
    return tuple(u.strip().rstrip("/") for s in raw for u in (s or "").split(",") if u.strip())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dws train", description="TRL AsyncGRPO over remote rollout replicas and env Spaces; publishes every "
        "policy version to a bucket as a lossless delta. Every flag defaults to the environment variable in brackets.")
    a = ap.add_argument
    i = lambda name, d: env_value(name, d, int)  # noqa: E731
    f = lambda name, d: env_value(name, d, float)  # noqa: E731
    a("--model", default=env_str("DWS_MODEL"), help=help_env("base model: Hub id or local folder", "DWS_MODEL"))
    a("--bucket", default=env_str("DWS_BUCKET"),
      help=help_env("hf://buckets/<ns>/<name>[/prefix] or a local folder", "DWS_BUCKET"))
    a("--rollout-url", dest="rollout_urls", action="append",
      help=help_env("a rollout replica base URL; repeat or comma-separate", "DWS_ROLLOUT_URLS"))
    a("--env-url", dest="env_urls", action="append",
      help=help_env("an env Space base URL; repeat or comma-separate (scoring round-robin, a failing one skipped "
                    "and retried)", "DWS_ENV_URL"))
    a("--task", default=env_str("DWS_TASK", "short"),
      help=help_env("env task(s), comma-separated; multi-turn tasks (wordle) are played as episodes", "DWS_TASK"))
    a("--steps", type=int, default=i("DWS_STEPS", 20), help=help_env("optimizer steps", "DWS_STEPS"))
    a("--lr", type=float, default=f("DWS_LR", 1e-3), help=help_env("learning rate", "DWS_LR"))
    a("--optim", default=env_str("DWS_OPTIM", "adamw_torch"), choices=["adamw_torch", "adamw_torch_fused", "sgd",
                                                                         "adafactor"],
      help=help_env("optimizer (transformers' TrainingArguments.optim)", "DWS_OPTIM"))
    a("--trainable", default=env_str("DWS_TRAINABLE"),
      help=help_env("train only parameters whose name matches this regex (default: all)", "DWS_TRAINABLE"))
    a("--prompts-per-step", type=int, default=i("DWS_PROMPTS_PER_STEP", 2),
      help=help_env("distinct prompts per optimizer step", "DWS_PROMPTS_PER_STEP"))
    a("--group-size", type=int, default=i("DWS_GROUP_SIZE", 4),
      help=help_env("completions per prompt (GRPO group)", "DWS_GROUP_SIZE"))
    a("--max-completion-length", type=int, default=i("DWS_MAX_COMPLETION_LENGTH", 16),
      help=help_env("tokens per completion (per turn for multi-turn tasks)", "DWS_MAX_COMPLETION_LENGTH"))
    a("--temperature", type=float, default=f("DWS_TEMPERATURE", 1.0),
      help=help_env("sampling temperature", "DWS_TEMPERATURE"))
    a("--epsilon", type=float, default=f("DWS_EPSILON", 0.2),
      help=help_env("clip range of the ratio current / sampling policy", "DWS_EPSILON"))
    a("--epsilon-high", type=float, default=env_value("DWS_EPSILON_HIGH", None, float),
      help=help_env("upper clip range (default: --epsilon)", "DWS_EPSILON_HIGH"))
    a("--num-prompts", type=int, default=i("DWS_NUM_PROMPTS", 64),
      help=help_env("prompts drawn from the env task(s) for the dataset", "DWS_NUM_PROMPTS"))
    a("--seed", type=int, default=i("DWS_SEED", 0), help=help_env("seed of the prompt order and of TRL", "DWS_SEED"))
    a("--max-staleness", "--staleness", dest="max_staleness", type=int, default=i("DWS_STALENESS", 1),
      help=help_env("a sample whose version lags the trainer by more than this many versions is dropped",
                    "DWS_STALENESS"))
    a("--weight-sync-steps", type=int, default=i("DWS_WEIGHT_SYNC_STEPS", 1),
      help=help_env("optimizer steps per published version", "DWS_WEIGHT_SYNC_STEPS"))
    a("--max-inflight", type=int, default=i("DWS_MAX_INFLIGHT", 0),
      help=help_env("generation requests in flight across all replicas (0: prompts per step)",
                    "DWS_MAX_INFLIGHT"))
    a("--queue-size", type=int, default=i("DWS_QUEUE_SIZE", 0),
      help=help_env("scored samples buffered ahead of the trainer; generation waits when it is full "
                    "(0: max-staleness batches)", "DWS_QUEUE_SIZE"))
    a("--max-turns", type=int, default=i("DWS_MAX_TURNS", 0),
      help=help_env("multi-turn tasks: turns per episode, 0 = the task's limit", "DWS_MAX_TURNS"))
    a("--max-episode-tokens", type=int, default=i("DWS_MAX_EPISODE_TOKENS", 1024),
      help=help_env("multi-turn tasks: completion + feedback tokens per episode", "DWS_MAX_EPISODE_TOKENS"))
    a("--anchor-every", type=int, default=i("DWS_ANCHOR_EVERY", 10),
      help=help_env("a full anchor at least every N versions", "DWS_ANCHOR_EVERY"))
    a("--anchor-fraction", type=float, default=f("DWS_ANCHOR_FRACTION", 0.5),
      help=help_env("an anchor as soon as the deltas since the last one exceed this fraction of it",
                    "DWS_ANCHOR_FRACTION"))
    a("--keep-anchors", type=int, default=i("DWS_KEEP_ANCHORS", 2),
      help=help_env("anchors (and their deltas) kept in the bucket", "DWS_KEEP_ANCHORS"))
    a("--encoding", default=env_str("DWS_ENCODING", "compact"), choices=["compact", "ctx", "raw"],
      help=help_env("delta encoding: compact (default), ctx (v2: smaller, conditioned on the base; slower to "
                    "encode and decode), raw (TRL's layout)", "DWS_ENCODING"))
    a("--run-id", default=env_str("DWS_RUN_ID"),
      help=help_env("names this run in the bucket's owner.json lease (default: SPACE_ID, else host-pid)",
                    "DWS_RUN_ID"))
    a("--take-over", action="store_true", default=env_bool("DWS_TAKE_OVER", False),
      help=help_env("take the bucket over from another live trainer instead of refusing", "DWS_TAKE_OVER"))
    a("--host", default=env_str("HOST", "0.0.0.0"), help=help_env("dashboard address", "HOST"))
    a("--port", type=int, default=i("PORT", 7860), help=help_env("dashboard port", "PORT"))
    a("--no-ui", action="store_true", default=not env_bool("DWS_UI", True),
      help=help_env("no Gradio page at / (GET /status and /health stay)", "DWS_UI=false"))
    # Outside a Space (SPACE_ID unset: a terminal, CI) a finished command should return; a Space keeps its dashboard.
    a("--exit-when-done", dest="exit_when_done", action=argparse.BooleanOptionalAction,
      default=env_bool("DWS_EXIT_WHEN_DONE", env_str("SPACE_ID") is None),
      help=help_env("exit when training ends; default: yes outside a Space (SPACE_ID unset), no inside one, where "
                    "the dashboard keeps serving", "DWS_EXIT_WHEN_DONE"))
    a("--output-dir", default=env_str("DWS_OUTPUT_DIR", "/tmp/dws-trainer"),
      help=help_env("TRL's output folder", "DWS_OUTPUT_DIR"))
    a("--request-timeout", dest="request_timeout_s", type=float, default=f("DWS_REQUEST_TIMEOUT", 120.0),
      help=help_env("seconds one request to a replica or env may take", "DWS_REQUEST_TIMEOUT"))
    a("--retry-after", dest="retry_after_s", type=float, default=f("DWS_RETRY_AFTER", 10.0),
      help=help_env("seconds a failing replica or env Space is skipped before it is tried again", "DWS_RETRY_AFTER"))
    a("--rollout-timeout", dest="rollout_timeout_s", type=float, default=f("DWS_ROLLOUT_TIMEOUT", 300.0),
      help=help_env("stop the run when no replica or no env Space has answered for this many seconds",
                    "DWS_ROLLOUT_TIMEOUT"))
    a("--api-key", default=env_str("DWS_API_KEY"),
      help=help_env("default bearer for replicas and env Spaces", "DWS_API_KEY"))
    a("--rollout-token", default=env_str("DWS_ROLLOUT_TOKEN"), help=help_env("bearer for replicas", "DWS_ROLLOUT_TOKEN"))
    a("--env-token", default=env_str("DWS_ENV_TOKEN"), help=help_env("bearer for the env Spaces", "DWS_ENV_TOKEN"))
    return ap


def parse_args(argv: list[str] | None = None) -> TrainerConfig:
    try:
        ap = build_parser()  # reads the environment: a malformed variable is reported like a bad flag
    except EnvVarError as e:
        argparse.ArgumentParser(prog="dws train").error(str(e))
    ns = ap.parse_args(argv)
    rollout_urls = _urls(ns.rollout_urls, "DWS_ROLLOUT_URLS")
    env_urls = _urls(ns.env_urls, "DWS_ENV_URL")
    missing = [n for n, v in (("--model", ns.model), ("--bucket", ns.bucket), ("--rollout-url", rollout_urls),
                              ("--env-url", env_urls)) if not v]
    if missing:
        ap.error("missing " + ", ".join(missing) + " (or the same-named DWS_* environment variables)")
    # A Hub id is "org/name"; anything that reads as a local path must be a model folder, or loading it later would
    # end in a transformers traceback after the bucket lease was already taken.
    model_path = Path(ns.model).expanduser()
    if (ns.model.startswith(("/", ".", "~")) or model_path.exists()) and not (model_path / "config.json").is_file():
        ap.error(f"--model {ns.model!r} is not a model folder (no config.json there)")
    if ns.trainable:
        try:
            re.compile(ns.trainable)
        except re.error as e:
            ap.error(f"--trainable {ns.trainable!r} is not a valid regular expression: {e}")
    for name, v, lo in (("--steps", ns.steps, 1), ("--prompts-per-step", ns.prompts_per_step, 1),
                        ("--group-size", ns.group_size, 2), ("--weight-sync-steps", ns.weight_sync_steps, 1),
                        ("--max-staleness", ns.max_staleness, 0), ("--max-completion-length",
                                                                   ns.max_completion_length, 1)):
        if v < lo:
            ap.error(f"{name} must be at least {lo}, got {v}")
    # Under torchrun: what the rank count cannot run is refused here, on every rank, before any process group forms.
    from trainer_space.sharded import Ranks, refusal

    try:
        ranks = Ranks.from_env()
    except ValueError as e:
        ap.error(str(e))
    why = refusal(world=ranks.world, batch_size=ns.prompts_per_step * ns.group_size, trainable=ns.trainable)
    if why:
        ap.error(why)
    return TrainerConfig(
        model=ns.model, bucket=ns.bucket, rollout_urls=rollout_urls, env_urls=env_urls, task=ns.task,
        steps=ns.steps, lr=ns.lr, optim=ns.optim, trainable=ns.trainable, prompts_per_step=ns.prompts_per_step,
        group_size=ns.group_size, max_completion_length=ns.max_completion_length, temperature=ns.temperature,
        epsilon=ns.epsilon, epsilon_high=ns.epsilon_high, num_prompts=ns.num_prompts, seed=ns.seed,
        max_staleness=ns.max_staleness, weight_sync_steps=ns.weight_sync_steps, max_inflight=ns.max_inflight,
        queue_size=ns.queue_size, max_turns=ns.max_turns, max_episode_tokens=ns.max_episode_tokens,
        anchor_every=ns.anchor_every, anchor_fraction=ns.anchor_fraction, keep_anchors=ns.keep_anchors,
        encoding=ns.encoding, run_id=ns.run_id, take_over=ns.take_over, host=ns.host, port=ns.port, ui=not ns.no_ui,
        exit_when_done=ns.exit_when_done, output_dir=ns.output_dir, request_timeout_s=ns.request_timeout_s,
        retry_after_s=ns.retry_after_s, rollout_timeout_s=ns.rollout_timeout_s, api_key=ns.api_key,
        rollout_token=ns.rollout_token or ns.api_key, env_token=ns.env_token or ns.api_key,
        hf_token=env_str("HF_TOKEN"))
