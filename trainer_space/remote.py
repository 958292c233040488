"""HTTP clients the trainer uses to reach the other two Spaces: rollout replicas and the env Space.

Owns `ReplicaPool` (completions with token ids + per-token logprobs + the `model_version` tag, spread round-robin
over every healthy replica, preferring those known to serve a requested version; a failing replica is skipped for a
while and retried later, a request refused as such raises `RolloutRequestError` without blaming the replica;
`/status` polling, the authenticated `POST /sync` nudge and `wait_for_version`) and `EnvScorer`
(`/v1/tasks/{task}/prompts` and batch `/v1/score`). Multi-turn episodes use OpenEnv's own client (`rollouts.py`). The trainer Space depends on
`shared/` only, never on `env_space` or `rollout_space` code (docs/design.md §2), hence its own small clients here.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("dws.trainer.remote")


class NoHealthyReplicaError(RuntimeError):
    pass


class RolloutRequestError(RuntimeError):
    """A replica refused the request itself (HTTP 400/413/422: e.g. a prompt beyond its context length). Every
    replica would refuse it the same way, so it is raised at once and no replica is marked as failing."""


# Statuses that describe the request, not the replica: failing over would only repeat them.
_REQUEST_ERRORS = {400, 413, 422}


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled completion with what the IS correction and the staleness guard need."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float | None]
    model_version: int | None
    replica: str


@dataclass(kw_only=True)
class ReplicaState:
    url: str
    healthy: bool = True
    down_until: float = 0.0
    failures: int = 0
    requests: int = 0
    last_error: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    status_at: float = 0.0
    last_version: int | None = None  # newest model_version seen in a response or /status

    def known_version(self) -> int | None:
        served = (self.status or {}).get("served_version")
        known = [v for v in (served, self.last_version) if v is not None]
        return max(known) if known else None

    def view(self) -> dict[str, Any]:
        st = self.status or {}
        last = st.get("last_sync") or {}
        pause = last.get("pause_s")
        return {"url": self.url, "healthy": self.healthy, "failures": self.failures, "requests": self.requests,
                "last_error": self.last_error, "served_version": st.get("served_version"),
                "latest_version": st.get("latest_version"), "lag": st.get("lag"),
                "digest_match": st.get("digest_match"),
                "last_pause_ms": None if pause is None else round(1000 * float(pause), 1),
                "status_age_s": round(time.time() - self.status_at, 1) if self.status_at else None}


class ReplicaPool:
    """Round-robin over replicas; each request goes to the next replica that is not in its back-off window."""

    def __init__(self, urls: tuple[str, ...] | list[str], *, token: str | None, model: str | None = None,
                 timeout_s: float = 120.0, retry_after_s: float = 10.0) -> None:
        if not urls:
            raise ValueError("at least one rollout replica URL is needed")
        self.replicas = [ReplicaState(url=u.rstrip("/")) for u in urls]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)
        self._lock = threading.Lock()
        self._rr = 0
        self.retry_after_s = retry_after_s
        self._model = model
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(urls)), thread_name_prefix="dws-rollout")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # -- replica choice / health -------------------------------------------------------------------------------
    def _next(self, exclude: set[str], min_version: int | None = None) -> ReplicaState:
        """Next replica in round-robin order that is not in back-off; with `min_version`, prefer those known to
        serve at least that version (any up replica otherwise: the caller's staleness check has the last word)."""
        with self._lock:
            now = time.time()
            n = len(self.replicas)
            order = [(self._rr + i) % n for i in range(n)]
            up = [i for i in order if self.replicas[i].url not in exclude and self.replicas[i].down_until <= now]
            if min_version is not None:
                fresh = [i for i in up if (self.replicas[i].known_version() or -1) >= min_version]
                up = fresh or up
            if up:
                self._rr = (up[0] + 1) % n
                return self.replicas[up[0]]
        raise NoHealthyReplicaError("no healthy rollout replica (all failing or in back-off): "
                                    + ", ".join(f"{r.url}: {r.last_error}" for r in self.replicas))

    def _mark_bad(self, r: ReplicaState, err: Exception) -> None:
        with self._lock:
            r.healthy, r.failures, r.last_error = False, r.failures + 1, f"{type(err).__name__}: {err}"[:300]
            # Skip it for a while rather than forever: a replica restarting vLLM comes back.
            r.down_until = time.time() + self.retry_after_s
        log.warning("replica %s failed (%s); skipping it for %.0fs", r.url, r.last_error, self.retry_after_s)

    def model_name(self, r: ReplicaState) -> str:
        if self._model is None:
            resp = self._http.get(f"{r.url}/v1/models")
            resp.raise_for_status()
            self._model = resp.json()["data"][0]["id"]
        return self._model

    # -- generation --------------------------------------------------------------------------------------------
    def _complete_once(self, r: ReplicaState, prompt_ids: list[int], n: int, *, max_tokens: int,
                       temperature: float) -> list[Completion]:
        body = {"model": self.model_name(r), "prompt": prompt_ids, "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "logprobs": 0, "return_token_ids": True}
        resp = self._http.post(f"{r.url}/v1/completions", json=body)
        if resp.status_code in _REQUEST_ERRORS:
            raise RolloutRequestError(f"replica {r.url} refused the request: HTTP {resp.status_code} "
                                      f"{resp.text[:300]}")
        resp.raise_for_status()
        data = resp.json()
        # A sync that landed while the request ran makes the gateway report [start, end]: the oldest one produced
        # part of the tokens, so the completion counts as that old for the staleness bound.
        tags = data.get("model_versions") or [data.get("model_version")]
        version = None if any(v is None for v in tags) else min(int(v) for v in tags)
        out = []
        for ch in sorted(data["choices"], key=lambda c: c.get("index", 0)):
            ids = ch.get("token_ids")
            lps = (ch.get("logprobs") or {}).get("token_logprobs")
            if ids is None or lps is None or len(ids) != len(lps):
                # Guards against a server that ignores return_token_ids/logprobs: without exact ids and logprobs
                # the IS correction would silently be wrong.
                raise ValueError("replica response lacks token_ids/token_logprobs of equal length")
            out.append(Completion(prompt_ids=list(prompt_ids), completion_ids=list(ids), logprobs=list(lps),
                                  model_version=None if version is None else int(version), replica=r.url))
        if len(out) != n:
            raise ValueError(f"asked for {n} completions, got {len(out)}")
        with self._lock:
            r.healthy, r.requests, r.last_error = True, r.requests + 1, None
            if version is not None and (r.last_version is None or version > r.last_version):
                r.last_version = version
        return out

    def complete(self, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float,
                 min_version: int | None = None) -> list[Completion]:
        """`n` completions of one prompt from one replica, failing over to the others."""
        tried: set[str] = set()
        while True:
            r = self._next(tried, min_version)
            try:
                return self._complete_once(r, prompt_ids, n, max_tokens=max_tokens, temperature=temperature)
            except (httpx.HTTPError, ValueError, KeyError) as e:
                self._mark_bad(r, e)
                tried.add(r.url)

    def complete_many(self, groups: list[tuple[list[int], int]], *, max_tokens: int, temperature: float,
                      min_version: int | None = None) -> list[list[Completion]]:
        """Several prompt groups concurrently, spread round-robin over the replicas."""
        futs = [self._pool.submit(self.complete, p, n, max_tokens=max_tokens, temperature=temperature,
                                  min_version=min_version) for p, n in groups]
        return [f.result() for f in futs]

    # -- sync state ----------------------------------------------------------------------------------------------
    def refresh_status(self) -> list[dict[str, Any]]:
        for r in self.replicas:
            try:
                resp = self._http.get(f"{r.url}/status", timeout=10)
                resp.raise_for_status()
                r.status, r.status_at = resp.json(), time.time()
                if r.down_until <= time.time():
                    r.healthy = True
            except httpx.HTTPError as e:
                r.healthy, r.last_error = False, f"status: {type(e).__name__}: {e}"[:300]
        return [r.view() for r in self.replicas]

    def nudge(self) -> None:
        """POST /sync on every replica: check the bucket now instead of at the next poll."""
        for r in self.replicas:
            try:
                self._http.post(f"{r.url}/sync", timeout=10)
            except httpx.HTTPError as e:
                log.debug("nudge %s failed: %s", r.url, e)

    def served_versions(self) -> dict[str, int | None]:
        self.refresh_status()
        return {r.url: (r.status or {}).get("served_version") for r in self.replicas if r.healthy}

    def wait_for_version(self, min_version: int, *, timeout_s: float, poll_s: float = 0.2,
                         nudge_every_s: float = 1.0) -> bool:
        """Nudge the replicas and poll their /status until one serves >= `min_version` (True) or time runs out."""
        deadline = time.monotonic() + timeout_s
        next_nudge = 0.0
        while True:
            if time.monotonic() >= next_nudge:
                self.nudge()
                next_nudge = time.monotonic() + nudge_every_s
            served = [v for v in self.served_versions().values() if v is not None]
            if served and max(served) >= min_version:
                return True
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)


class EnvScorer:
    """Prompts and batch rewards from the env Space (single-turn tasks)."""

    def __init__(self, url: str, *, token: str | None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def _ok(self, resp: httpx.Response) -> dict:
        if resp.status_code >= 400:
            raise RuntimeError(f"env Space {resp.request.url.path}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def task_info(self, task: str) -> dict:
        for t in self._ok(self._http.get("/v1/tasks"))["tasks"]:
            if t["name"] == task:
                return t
        raise ValueError(f"env Space has no task {task!r}")

    def prompts(self, task: str, *, n: int, seed: int | None = None) -> list[dict]:
        params = {"n": n} if seed is None else {"n": n, "seed": seed}
        return self._ok(self._http.get(f"/v1/tasks/{task}/prompts", params=params))["prompts"]

    def score(self, task: str, prompt_ids: list[str], completions: list[str]) -> list[float]:
        items = [{"prompt_id": p, "completion": c} for p, c in zip(prompt_ids, completions, strict=True)]
        rewards = self._ok(self._http.post("/v1/score", json={"task": task, "items": items}))["rewards"]
        if len(rewards) != len(items):
            raise RuntimeError(f"env Space returned {len(rewards)} rewards for {len(items)} items")
        return [float(x) for x in rewards]
