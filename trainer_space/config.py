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
    task: str = "short"
    steps: int = 20
    lr: float = 1e-3
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
    is_mode: str = "token_truncate"  # TRL's vllm_importance_sampling_mode, applied to remote logprobs
    is_clip_max: float = 3.0
    anchor_every: int = 10
    anchor_fraction: float = 0.5
    keep_anchors: int = 2
    encoding: str = "compact"
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
    a("--task", default=_env("DWS_TASK", "short"), help="single-turn env task [DWS_TASK]")
    a("--steps", type=int, default=int(_env("DWS_STEPS", 20)), help="optimizer steps [DWS_STEPS]")
    a("--lr", type=float, default=float(_env("DWS_LR", 1e-3)), help="learning rate [DWS_LR]")
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
    a("--is-mode", default=_env("DWS_IS_MODE", "token_truncate"),
      choices=["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
    a("--is-clip-max", type=float, default=float(_env("DWS_IS_CLIP_MAX", 3.0)))
    a("--anchor-every", type=int, default=int(_env("DWS_ANCHOR_EVERY", 10)))
    a("--anchor-fraction", type=float, default=float(_env("DWS_ANCHOR_FRACTION", 0.5)))
    a("--keep-anchors", type=int, default=int(_env("DWS_KEEP_ANCHORS", 2)))
    a("--encoding", default=_env("DWS_ENCODING", "compact"), choices=["compact", "raw"])
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
    return TrainerConfig(
        model=ns.model, bucket=ns.bucket, rollout_urls=rollout_urls, env_url=ns.env_url.rstrip("/"), task=ns.task,
        steps=ns.steps, lr=ns.lr, prompts_per_step=ns.prompts_per_step, group_size=ns.group_size,
        max_completion_length=ns.max_completion_length, temperature=ns.temperature, beta=ns.beta,
        num_prompts=ns.num_prompts, seed=ns.seed, staleness=ns.staleness, stale_wait_s=ns.stale_wait_s,
        is_mode=ns.is_mode, is_clip_max=ns.is_clip_max, anchor_every=ns.anchor_every,
        anchor_fraction=ns.anchor_fraction, keep_anchors=ns.keep_anchors, encoding=ns.encoding, host=ns.host,
        port=ns.port, ui=not ns.no_ui, output_dir=ns.output_dir, api_key=ns.api_key,
        rollout_token=ns.rollout_token or ns.api_key, env_token=ns.env_token or ns.api_key,
        hf_token=_env("HF_TOKEN"))
