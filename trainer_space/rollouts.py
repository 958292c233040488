"""One GRPO group from one dataset row: its completions (or episodes) from the replicas, their rewards from the env
Spaces, and the training rows TRL's AsyncGRPOTrainer consumes.

Owns:
- `TurnTemplate` -- the token ids between two model turns, from the tokenizer's own chat template.
- `play_group` -- single-turn tasks: one `/v1/completions` request with n = group size on a replica, then one batch
  `/v1/score` on an env Space. Multi-turn tasks (Wordle): one episode per member through OpenEnv's own client
  (`GenericEnvClient`, a WebSocket session on an env Space): generate a turn on a replica, `step` the session with it,
  append the env's feedback as the next user turn, until done or the turn/token limits; the episode return is the
  reward.
- `to_rollout_samples` -- group-normalised advantages ((r - mean) / (std + 1e-8), TRL's own formula) and TRL
  `RolloutSample`s: `input_ids` = prompt + completion, `completion_mask` 1 only on the model's own tokens,
  `old_log_probs` = the replica's per-token logprobs at those positions, `model_version` = the oldest version tag of
  any token in the group (a request that spanned a sync already reports its older version).

Multi-turn token layout: the completion is every turn concatenated, in the exact token ids the replicas saw -- model
turn 1, the chat-template tokens that close it and carry the env feedback as a user message, model turn 2, ... The
feedback tokens get mask 0 (no loss, no ratio) and logprob 0.0, so the sampling logprobs line up token for token with
the trainer's forward pass over prompt + completion.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from trainer_space.remote import Completion, EnvPool, ReplicaPool

_MARK = "\u2063dws-turn\u2063"  # a string no chat template rewrites, to find where assistant content ends

#: The version of a completion whose replica could not say which weights served it: older than anything, so TRL's
#: staleness check drops it instead of trusting it.
UNTAGGED = -(10 ** 9)


@dataclass(kw_only=True)
class Sample:
    """One group member as GRPO trains on it, plus where it came from."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    env_mask: list[int]  # 1 = a model token, 0 = env feedback / chat scaffolding between turns
    versions: list[int | None]  # version tag of each turn
    replicas: list[str]
    text: str = ""
    turns: int = 1
    reward: float | None = None
    done: bool | None = None

    @property
    def oldest_version(self) -> int:
        return UNTAGGED if any(v is None for v in self.versions) else min(self.versions)


@dataclass(kw_only=True)
class Group:
    row: dict
    samples: list[Sample]
    generate_s: float = 0.0
    score_s: float = 0.0
    multi_turn: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def version(self) -> int:
        return min(s.oldest_version for s in self.samples)


class TurnTemplate:
    """Token ids between two model turns, taken from the tokenizer's own chat template (no hard-coded markers):
    whatever closes an assistant message, then the env feedback as a user message, then the assistant header."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos_ids = {i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None))
                        if i is not None}
        self._cache: dict[str, list[int]] = {}

    def prompt_ids(self, text: str) -> list[int]:
        if text not in self._cache:
            t = text
            if self.chat:
                t = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
            self._cache[text] = list(self.tok(t, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def between(self, feedback: str, *, last_ids: list[int]) -> list[int]:
        if not self.chat:
            return list(self.tok("\n" + feedback + "\n", add_special_tokens=False)["input_ids"])
        conv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _MARK},
                {"role": "user", "content": feedback}]
        text = self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        text = text[text.rindex(_MARK) + len(_MARK):]
        eos = self.tok.eos_token or ""
        # The replica's tokens already end with the end-of-turn token when the model stopped by itself: adding the
        # template's copy would put two in a row, a sequence the model never produces.
        if last_ids and last_ids[-1] in self.eos_ids and eos and text.startswith(eos):
            text = text[len(eos):]
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


@dataclass(kw_only=True)
class GroupPlayer:
    """Plays one group for a dataset row ({"prompt", "prompt_id", "task"})."""

    pool: ReplicaPool
    envs: EnvPool
    template: TurnTemplate
    executor: Executor  # blocking HTTP calls of concurrent episodes; asyncio's default pool is a handful of threads
    env_token: str | None
    group_size: int
    max_tokens: int
    temperature: float
    multi_turn: set[str]
    task_max_turns: dict[str, int]
    max_turns: int = 0
    max_episode_tokens: int = 1024

    def play(self, row: dict, *, min_version: int | None = None) -> Group:
        if row["task"] in self.multi_turn:
            t0 = time.perf_counter()
            samples = asyncio.run(self._episodes(row, min_version))
            return Group(row=row, samples=samples, generate_s=time.perf_counter() - t0, multi_turn=True)
        t0 = time.perf_counter()
        comps = self.pool.complete(self.template.prompt_ids(row["prompt"]), self.group_size,
                                   max_tokens=self.max_tokens, temperature=self.temperature, min_version=min_version)
        t1 = time.perf_counter()
        samples = [self._single(c) for c in comps]
        rewards = self.envs.score(row["task"], [row["prompt_id"]] * len(samples), [s.text for s in samples])
        for s, r in zip(samples, rewards, strict=True):
            s.reward = r
        return Group(row=row, samples=samples, generate_s=t1 - t0, score_s=time.perf_counter() - t1)

    def _single(self, c: Completion) -> Sample:
        return Sample(prompt_ids=c.prompt_ids, completion_ids=c.completion_ids, logprobs=c.logprobs,
                      env_mask=[1] * len(c.completion_ids), versions=[c.model_version], replicas=[c.replica],
                      text=self.template.tok.decode(c.completion_ids, skip_special_tokens=True))

    async def _complete(self, ids: list[int], min_version: int | None) -> Completion:
        call = partial(self.pool.complete, ids, 1, max_tokens=self.max_tokens, temperature=self.temperature,
                       min_version=min_version)
        return (await asyncio.get_running_loop().run_in_executor(self.executor, call))[0]

    async def _episodes(self, row: dict, min_version: int | None) -> list[Sample]:
        return list(await asyncio.gather(*[self._episode_anywhere(row, min_version)
                                           for _ in range(self.group_size)]))

    async def _episode_anywhere(self, row: dict, min_version: int | None) -> Sample:
        """One episode on the next env Space; a Space that cannot be reached is skipped and the episode restarted
        on another (an episode is never continued across Spaces: the session state lives on one)."""
        tried: set[str] = set()
        while True:
            url = self.envs.next_url()
            if url in tried:
                raise ConnectionError(f"no env Space could run an episode: {self.envs.describe_errors()}")
            try:
                s = await self._episode(url, row, min_version)
                self.envs.session_ok(url)
                return s
            except (OSError, ConnectionError, TimeoutError) as e:
                self.envs.session_failed(url, e)
                tried.add(url)

    async def _episode(self, url: str, row: dict, min_version: int | None) -> Sample:
        from openenv.core.generic_client import GenericEnvClient

        headers = {"Authorization": f"Bearer {self.env_token}"} if self.env_token else None
        limit = self.task_max_turns.get(row["task"], 1)
        if self.max_turns > 0:
            limit = min(limit, self.max_turns)
        async with GenericEnvClient(base_url=url, headers=headers) as env:
            res = await env.reset(task=row["task"], prompt_id=row["prompt_id"])
            prompt_ids = self.template.prompt_ids(res.observation["prompt"])
            completion: list[int] = []
            mask: list[int] = []
            lps: list[float] = []
            versions: list[int | None] = []
            replicas: list[str] = []
            ret, turns = 0.0, 0
            while True:
                c = await self._complete(prompt_ids + completion, min_version)
                completion += c.completion_ids
                mask += [1] * len(c.completion_ids)
                lps += c.logprobs
                versions.append(c.model_version)
                replicas.append(c.replica)
                text = self.template.tok.decode(c.completion_ids, skip_special_tokens=True)
                res = await env.step({"text": text})
                ret += float(res.reward or 0.0)
                turns += 1
                if res.done or turns >= limit:
                    break
                feedback = self.template.between(str(res.observation.get("feedback", "")),
                                                 last_ids=c.completion_ids)
                # The next turn must fit the budget with room for a full reply; an episode cut here keeps the
                # return earned so far (the env already scored every turn played).
                if len(completion) + len(feedback) + self.max_tokens > self.max_episode_tokens:
                    break
                completion += feedback
                mask += [0] * len(feedback)
                lps += [0.0] * len(feedback)
        return Sample(prompt_ids=prompt_ids, completion_ids=completion, logprobs=lps, env_mask=mask,
                      versions=versions, replicas=sorted(set(replicas)), turns=turns, reward=ret,
                      done=bool(res.done))


def advantages(rewards: list[float]) -> list[float]:
    """GRPO's group-normalised advantage, as TRL computes it: (r - mean) / (std + 1e-8), population std."""
    r = np.asarray(rewards, dtype=float)
    return ((r - r.mean()) / (r.std() + 1e-8)).tolist()


def to_rollout_samples(group: Group, group_id: int) -> list:
    """The group as TRL `RolloutSample`s, every member stamped with the group's oldest version."""
    from trl.experimental.async_grpo.async_rollout_worker import RolloutSample

    rewards = [float(s.reward) for s in group.samples]
    adv = advantages(rewards)
    std = float(np.std(rewards))
    version = group.version
    task = group.row["task"]
    out = []
    now = time.time()
    for s, a, r in zip(group.samples, adv, rewards, strict=True):
        n_prompt = len(s.prompt_ids)
        metrics = {"reward": r, "reward_std": std, f"rewards/{task}": r}
        if group.multi_turn:
            metrics.update({"episode/turns": float(s.turns), "episode/return": r})
        out.append(RolloutSample(
            prompt=[{"role": "user", "content": group.row.get("prompt", "")}],
            completion=[{"role": "assistant", "content": s.text}],
            input_ids=np.asarray(s.prompt_ids + s.completion_ids, dtype=np.int64),
            completion_mask=np.asarray([0] * n_prompt + s.env_mask, dtype=np.int64),
            old_log_probs=np.asarray([0.0] * n_prompt + s.logprobs, dtype=np.float32),
            advantage=float(a), model_version=int(version), group_id=group_id, metrics=metrics, enqueued_at=now))
    return out
