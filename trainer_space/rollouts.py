"""Producing one training batch from dataset rows, and producing the next one while the current one trains.

Owns:
- `PromptSchedule` -- the run's row order, fixed before training (TRL's sampler layout: each prompt repeated
  `group_size` times, `prompts_per_step` prompts per step). Knowing step k+1's rows while step k trains is what lets
  generation run ahead; TRL reads the same object as its train sampler, so both sides agree by construction.
- `BatchProducer` -- rows -> `Sample`s. Single-turn tasks: one `/v1/completions` request per group on a replica.
  Multi-turn tasks (Wordle): one episode per row through OpenEnv's own client (`GenericEnvClient`, a WebSocket
  session on the env Space): generate a turn on a replica, `step` the session with it, append the env's feedback as
  the next user turn, until the episode is done or the turn/token limits are reached; the episode return is the
  reward.
- `Prefetcher` -- one background worker that waits (bounded) for the replicas to serve the version a batch will
  need, then produces it; the training thread takes it when TRL asks for that step.

Multi-turn token layout (what GRPO trains on): the completion is every turn concatenated, in the exact token ids the
replicas saw -- model turn 1, the chat-template tokens that close it and carry the env feedback as a user message,
model turn 2, ... The feedback tokens get `env_mask` 0 and logprob 0.0. TRL 1.16 takes `env_mask` from a rollout_func
as its `tool_mask`: it multiplies it into the loss mask and into the importance-sampling difference, so only the
model's own tokens are trained and corrected, and the sampling logprobs line up token for token with the trainer's
forward pass over prompt + completion.

The trainer Space depends on `shared/` only (docs/design.md §2): the env session uses OpenEnv's generic client, not
`env_space.client`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.data import Sampler

from trainer_space.remote import Completion, ReplicaPool

log = logging.getLogger("dws.trainer.rollouts")

_MARK = "\u2063dws-turn\u2063"  # a string no chat template rewrites, to find where assistant content ends


class PromptSchedule(Sampler[int]):
    """Dataset row indices for the whole run: per epoch a seeded permutation, cut into steps of `prompts_per_step`
    distinct rows (the tail that does not fill a step is dropped, as TRL's RepeatSampler does), each row repeated
    `group_size` times in a row (one GRPO group)."""

    def __init__(self, n_rows: int, *, prompts_per_step: int, group_size: int, steps: int, seed: int) -> None:
        if n_rows < prompts_per_step:
            raise ValueError(f"{n_rows} prompts cannot fill a step of {prompts_per_step} distinct prompts")
        self.group_size = group_size
        gen = torch.Generator().manual_seed(seed)
        self.steps: list[list[int]] = []
        while len(self.steps) < steps:
            perm = torch.randperm(n_rows, generator=gen).tolist()
            for i in range(0, n_rows - prompts_per_step + 1, prompts_per_step):
                self.steps.append(perm[i:i + prompts_per_step])
        del self.steps[steps:]

    def rows_for_step(self, step: int) -> list[int] | None:
        """Row indices TRL will hand over for optimizer step `step` (1-based), or None past the end."""
        if not 1 <= step <= len(self.steps):
            return None
        return [r for r in self.steps[step - 1] for _ in range(self.group_size)]

    def __iter__(self):
        return iter([r for rows in self.steps for r in rows for _ in range(self.group_size)])

    def __len__(self) -> int:
        return len(self.steps) * len(self.steps[0]) * self.group_size if self.steps else 0


@dataclass(kw_only=True)
class Sample:
    """One batch row as GRPO trains on it, plus where it came from."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    env_mask: list[int]  # 1 = a model token, 0 = env feedback / chat scaffolding between turns
    versions: list[int | None]  # model_version of each turn
    replicas: list[str]
    turns: int = 1
    env_return: float | None = None  # multi-turn: the episode's summed reward from the env session
    done: bool | None = None

    @property
    def oldest_version(self) -> int | None:
        return None if any(v is None for v in self.versions) else min(self.versions)


@dataclass(kw_only=True)
class RolloutBatch:
    samples: list[Sample]
    rows_key: tuple
    generate_s: float  # wall time producing it (after any wait for replicas)
    replica_wait_s: float = 0.0  # prefetch only: waiting for the replicas to reach the needed version
    source: str = "sync"  # "sync" (made when TRL asked) or "prefetch" (made during the previous step)

    @property
    def versions(self) -> list[int | None]:
        return [s.oldest_version for s in self.samples]

    def episodes(self) -> list[Sample]:
        return [s for s in self.samples if s.env_return is not None]


def rows_key(rows: list[dict]) -> tuple:
    return tuple((r.get("task"), r.get("prompt_id"), r.get("prompt")) for r in rows)


class TurnTemplate:
    """Token ids between two model turns, taken from the tokenizer's own chat template (no hard-coded markers):
    whatever closes an assistant message, then the env feedback as a user message, then the assistant header."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.eos_ids = {i for i in (tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None))
                        if i is not None}

    def prompt_ids(self, text: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

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


class BatchProducer:
    """Rows (TRL's batch: each prompt `group_size` times in a row) -> one `Sample` per row, in order."""

    def __init__(self, *, pool: ReplicaPool, tokenizer: Any, env_url: str, env_token: str | None,
                 multi_turn: set[str], group_size: int, max_tokens: int, temperature: float, max_turns: int,
                 max_episode_tokens: int, task_max_turns: dict[str, int]) -> None:
        self.pool, self.tok = pool, tokenizer
        self.template = TurnTemplate(tokenizer)
        self.env_url, self.env_token = env_url, env_token
        self.multi_turn, self.group_size = multi_turn, group_size
        self.max_tokens, self.temperature = max_tokens, temperature
        self.max_turns, self.max_episode_tokens = max_turns, max_episode_tokens
        self.task_max_turns = task_max_turns
        self._ids_cache: dict[str, list[int]] = {}
        # Every turn of every episode in a batch may be waiting on a replica at once; asyncio's default executor
        # (a handful of threads on a small machine) would serialise them.
        self._requests = ThreadPoolExecutor(max_workers=64, thread_name_prefix="dws-generate")

    def close(self) -> None:
        self._requests.shutdown(wait=False, cancel_futures=True)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._ids_cache:
            self._ids_cache[prompt] = self.template.prompt_ids(prompt)
        return self._ids_cache[prompt]

    def produce(self, rows: list[dict], *, min_version: int | None = None) -> RolloutBatch:
        t0 = time.perf_counter()
        samples = asyncio.run(self._produce(rows, min_version))
        return RolloutBatch(samples=samples, rows_key=rows_key(rows), generate_s=time.perf_counter() - t0)

    async def _produce(self, rows: list[dict], min_version: int | None) -> list[Sample]:
        jobs = []
        # TRL's sampler puts each group's rows next to each other; a run of identical rows is one GRPO group.
        i = 0
        while i < len(rows):
            j = i + 1
            while j < len(rows) and j - i < self.group_size and rows_key([rows[j]]) == rows_key([rows[i]]):
                j += 1
            row = rows[i]
            if row.get("task") in self.multi_turn:
                jobs += [self._episode(row, min_version) for _ in range(j - i)]
            else:
                jobs.append(self._group(row, j - i, min_version))
            i = j
        out: list[Sample] = []
        for res in await asyncio.gather(*jobs):
            out += res if isinstance(res, list) else [res]
        if len(out) != len(rows):
            raise RuntimeError(f"produced {len(out)} samples for {len(rows)} rows")
        return out

    async def _complete(self, ids: list[int], n: int, min_version: int | None) -> list[Completion]:
        call = partial(self.pool.complete, ids, n, max_tokens=self.max_tokens, temperature=self.temperature,
                       min_version=min_version)
        return await asyncio.get_running_loop().run_in_executor(self._requests, call)

    async def _group(self, row: dict, n: int, min_version: int | None) -> list[Sample]:
        comps = await self._complete(self._prompt_ids(row["prompt"]), n, min_version)
        return [Sample(prompt_ids=c.prompt_ids, completion_ids=c.completion_ids, logprobs=c.logprobs,
                       env_mask=[1] * len(c.completion_ids), versions=[c.model_version], replicas=[c.replica])
                for c in comps]

    async def _episode(self, row: dict, min_version: int | None) -> Sample:
        from openenv.core.generic_client import GenericEnvClient

        headers = {"Authorization": f"Bearer {self.env_token}"} if self.env_token else None
        limit = self.task_max_turns.get(row["task"], 1)
        if self.max_turns > 0:
            limit = min(limit, self.max_turns)
        async with GenericEnvClient(base_url=self.env_url, headers=headers) as env:
            res = await env.reset(task=row["task"], prompt_id=row["prompt_id"])
            prompt_ids = self.template.prompt_ids(res.observation["prompt"])
            completion: list[int] = []
            mask: list[int] = []
            lps: list[float] = []
            versions: list[int | None] = []
            replicas: list[str] = []
            ret, turns = 0.0, 0
            while True:
                c = (await self._complete(prompt_ids + completion, 1, min_version))[0]
                completion += c.completion_ids
                mask += [1] * len(c.completion_ids)
                lps += [0.0 if lp is None else float(lp) for lp in c.logprobs]
                versions.append(c.model_version)
                replicas.append(c.replica)
                text = self.tok.decode(c.completion_ids, skip_special_tokens=True)
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
                      versions=versions, replicas=sorted(set(replicas)), turns=turns, env_return=ret,
                      done=bool(res.done))


@dataclass(kw_only=True)
class _Pending:
    step: int
    key: tuple
    future: Future
    submitted: float = field(default_factory=time.perf_counter)


class Prefetcher:
    """Produces the batch of step k+1 on a background thread while step k trains.

    Before generating, the worker waits (at most `wait_s`) until a replica serves `min_version` -- the oldest version
    the staleness bound will accept when the batch is consumed; generating earlier would only make a batch that is
    thrown away. The consumer still checks the batch against the bound when it takes it.
    """

    def __init__(self, producer: BatchProducer, pool: ReplicaPool, *, wait_s: float) -> None:
        self.producer, self.pool, self.wait_s = producer, pool, wait_s
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dws-prefetch")
        self._pending: _Pending | None = None

    def submit(self, step: int, rows: list[dict], *, min_version: int) -> None:
        if self._pending is not None:
            self._pending.future.cancel()
        self._pending = _Pending(step=step, key=rows_key(rows),
                                 future=self._ex.submit(self._run, rows, min_version))

    def _run(self, rows: list[dict], min_version: int) -> RolloutBatch:
        t0 = time.perf_counter()
        if self.wait_s > 0:
            self.pool.wait_for_version(min_version, timeout_s=self.wait_s)
        waited = time.perf_counter() - t0
        batch = self.producer.produce(rows, min_version=min_version)
        batch.replica_wait_s, batch.source = waited, "prefetch"
        return batch

    def take(self, step: int, rows: list[dict]) -> tuple[RolloutBatch | None, float]:
        """The prefetched batch for `step` if it was made for exactly these rows, and how long the caller waited
        for it; (None, waited) on a miss or when the prefetch failed (the caller then generates synchronously)."""
        p, self._pending = self._pending, None
        if p is None:
            return None, 0.0
        if p.step != step or p.key != rows_key(rows):
            p.future.cancel()
            log.warning("prefetched batch was made for other rows than TRL's step %d; generating now", step)
            return None, 0.0
        t0 = time.perf_counter()
        try:
            batch = p.future.result()
        except Exception as e:  # a failed prefetch is retried in the foreground, where a real error surfaces
            log.warning("prefetch for step %d failed (%s: %s); generating now", step, type(e).__name__, e)
            return None, time.perf_counter() - t0
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        if self._pending is not None:
            self._pending.future.cancel()
        self._ex.shutdown(wait=False, cancel_futures=True)

