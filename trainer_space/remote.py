"""HTTP clients the trainer uses to reach the other Spaces: rollout replicas and env Spaces, several of each.

Owns `ReplicaPool` (completions with token ids + per-token logprobs + the version tag, spread round-robin over every
healthy replica, preferring those known to serve a fresh enough version; a failing replica is skipped for a while and
retried later; a request refused as such raises `RolloutRequestError` without blaming the replica; `/status`
polling, the authenticated `POST /sync` nudge; per-replica throughput) and `EnvPool` (the one env scoring client:
`/v1/tasks`, `/v1/tasks/{task}/prompts`, batch `/v1/score`, round-robin over the env Spaces with the same skip and
retry). What crosses Spaces is read and written through `shared.wire`'s types. Multi-turn episodes use OpenEnv's own
client (`rollouts.py`), on an env Space this pool picks. The trainer Space depends on `shared/` only, never on
`env_space` or `rollout_space` code (DESIGN.md §2), hence its own small clients here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from shared.wire import (
    MODEL_VERSION_FIELD,
    MODEL_VERSION_HEADER,
    MODEL_VERSIONS_FIELD,
    PromptOut,
    ReplicaStatus,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TaskInfo,
)

log = logging.getLogger("dws.trainer.remote")


class NoHealthyReplicaError(RuntimeError):
    pass


class NoHealthyEnvError(RuntimeError):
    pass


class RolloutRequestError(RuntimeError):
    """A replica or env refused the request itself (HTTP 400/413/422: e.g. a prompt beyond the context length).
    Every peer would refuse it the same way, so it is raised at once and no peer is marked as failing."""


# Statuses that describe the request, not the peer: failing over would only repeat them.
_REQUEST_ERRORS = {400, 404, 413, 422}


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One sampled completion with what the loss ratio and the staleness check need."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    model_version: int | None  # None: the replica could not say which weights produced it
    replica: str


@dataclass(kw_only=True)
class Peer:
    """One replica or env Space as the trainer sees it."""

    url: str
    healthy: bool = True
    down_until: float = 0.0
    failures: int = 0
    requests: int = 0
    last_error: str | None = None
    last_ok: float = 0.0
    # replicas only
    status: ReplicaStatus | None = None
    status_at: float = 0.0
    last_version: int | None = None  # newest version seen in a response or /status
    completions: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0  # summed request time: tokens / busy_s is what one request stream gets

    def known_version(self) -> int | None:
        served = self.status.served_version if self.status else None
        known = [v for v in (served, self.last_version) if v is not None]
        return max(known) if known else None

    def view(self, since: float) -> dict[str, Any]:
        st = self.status
        last = st.last_sync if st else None
        elapsed = max(1e-9, time.time() - since)
        return {"url": self.url, "healthy": self.healthy, "failures": self.failures, "requests": self.requests,
                "last_error": self.last_error, "served_version": st.served_version if st else None,
                "latest_version": st.latest_version if st else None, "lag": st.lag if st else None,
                "digest_match": st.digest_match if st else None,
                "last_pause_ms": None if last is None else round(1000 * float(last.pause_s), 1),
                "completions": self.completions, "completion_tokens": self.completion_tokens,
                "tokens_per_s": round(self.completion_tokens / elapsed, 2),
                "status_age_s": round(time.time() - self.status_at, 1) if self.status_at else None}


class _Peers:
    """Round-robin over peers; each request goes to the next one that is not in its back-off window."""

    kind = "peer"

    def __init__(self, urls, *, token: str | None, timeout_s: float, retry_after_s: float) -> None:
        if not urls:
            raise ValueError(f"at least one {self.kind} URL is needed")
        self.peers = [Peer(url=u.rstrip("/")) for u in urls]
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._rr = 0
        self.retry_after_s = retry_after_s
        self.started = time.time()

    @property
    def _http(self) -> httpx.Client:
        # Opened on first use and again after close(): the dashboard keeps reading replica /status after training
        # has ended and closed the pool.
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(headers=self._headers, timeout=self._timeout_s,
                                            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _order(self, exclude: set[str]) -> list[Peer]:
        now = time.time()
        n = len(self.peers)
        order = [self.peers[(self._rr + i) % n] for i in range(n)]
        return [p for p in order if p.url not in exclude and p.down_until <= now]

    def _take(self, p: Peer) -> Peer:
        self._rr = (self.peers.index(p) + 1) % len(self.peers)
        return p

    def _mark_bad(self, p: Peer, err: Exception) -> None:
        with self._lock:
            p.healthy, p.failures, p.last_error = False, p.failures + 1, f"{type(err).__name__}: {err}"[:300]
            # Skip it for a while rather than forever: a replica restarting vLLM, an env Space rebuilding, come back.
            p.down_until = time.time() + self.retry_after_s
        log.warning("%s %s failed (%s); skipping it for %.0fs", self.kind, p.url, p.last_error, self.retry_after_s)

    def _mark_ok(self, p: Peer) -> None:
        with self._lock:
            p.healthy, p.requests, p.last_error, p.last_ok = True, p.requests + 1, None, time.time()

    def last_ok(self) -> float:
        return max((p.last_ok for p in self.peers), default=0.0)

    def none_up(self) -> bool:
        now = time.time()
        return all(p.down_until > now or not p.healthy for p in self.peers)

    def describe_errors(self) -> str:
        return ", ".join(f"{p.url}: {p.last_error}" for p in self.peers)


class ReplicaPool(_Peers):
    kind = "replica"

    def __init__(self, urls, *, token: str | None, model: str | None = None, timeout_s: float = 120.0,
                 retry_after_s: float = 10.0) -> None:
        super().__init__(urls, token=token, timeout_s=timeout_s, retry_after_s=retry_after_s)
        self._model = model

    @property
    def replicas(self) -> list[Peer]:
        return self.peers

    def _next(self, exclude: set[str], min_version: int | None) -> Peer:
        """Next replica in round-robin order not in back-off; with `min_version`, prefer those known to serve at
        least that version (any up replica otherwise: the trainer's staleness check has the last word)."""
        with self._lock:
            up = self._order(exclude)
            if min_version is not None:
                up = [p for p in up if (p.known_version() or -1) >= min_version] or up
            if up:
                return self._take(up[0])
        raise NoHealthyReplicaError("no healthy rollout replica (all failing or in back-off): "
                                    + self.describe_errors())

    def model_name(self, r: Peer) -> str:
        if self._model is None:
            resp = self._http.get(f"{r.url}/v1/models")
            resp.raise_for_status()
            self._model = resp.json()["data"][0]["id"]
        return self._model

    def _complete_once(self, r: Peer, prompt_ids: list[int], n: int, *, max_tokens: int,
                       temperature: float) -> list[Completion]:
        body = {"model": self.model_name(r), "prompt": prompt_ids, "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "logprobs": 0, "return_token_ids": True}
        t0 = time.perf_counter()
        resp = self._http.post(f"{r.url}/v1/completions", json=body)
        if resp.status_code in _REQUEST_ERRORS:
            raise RolloutRequestError(f"replica {r.url} refused the request: HTTP {resp.status_code} "
                                      f"{resp.text[:300]}")
        resp.raise_for_status()
        data = resp.json()
        # A sync that landed while the request ran makes the gateway report [start, end]: the oldest one produced
        # part of the tokens, so the completion counts as that old for the staleness bound.
        tags = data.get(MODEL_VERSIONS_FIELD) or [data.get(MODEL_VERSION_FIELD, resp.headers.get(MODEL_VERSION_HEADER))]
        version = None if any(v is None for v in tags) else min(int(v) for v in tags)
        out = []
        for ch in sorted(data["choices"], key=lambda c: c.get("index", 0)):
            ids = ch.get("token_ids")
            lps = (ch.get("logprobs") or {}).get("token_logprobs")
            if ids is None or lps is None or len(ids) != len(lps):
                # Guards against a server that ignores return_token_ids/logprobs: without exact ids and logprobs
                # the ratio current / sampling policy would silently be wrong.
                raise ValueError("replica response lacks token_ids/token_logprobs of equal length")
            out.append(Completion(prompt_ids=list(prompt_ids), completion_ids=list(ids),
                                  logprobs=[0.0 if lp is None else float(lp) for lp in lps],
                                  model_version=version, replica=r.url))
        if len(out) != n:
            raise ValueError(f"asked for {n} completions, got {len(out)}")
        self._mark_ok(r)
        with self._lock:
            r.completions += n
            r.completion_tokens += sum(len(c.completion_ids) for c in out)
            r.busy_s += time.perf_counter() - t0
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

    # -- sync state ----------------------------------------------------------------------------------------------
    def refresh_status(self) -> list[dict[str, Any]]:
        for r in self.replicas:
            try:
                resp = self._http.get(f"{r.url}/status", timeout=10)
                resp.raise_for_status()
                r.status, r.status_at = ReplicaStatus.model_validate(resp.json()), time.time()
                if r.down_until <= time.time():
                    r.healthy = True
            except (httpx.HTTPError, ValidationError, ValueError) as e:
                r.healthy, r.last_error = False, f"status: {type(e).__name__}: {e}"[:300]
        return self.views()

    def views(self) -> list[dict[str, Any]]:
        return [r.view(self.started) for r in self.replicas]

    def nudge(self) -> None:
        """POST /sync on every replica: check the bucket now instead of at the next poll."""
        for r in self.replicas:
            try:
                self._http.post(f"{r.url}/sync", timeout=10)
            except httpx.HTTPError as e:
                log.debug("nudge %s failed: %s", r.url, e)

    def freshest(self) -> int | None:
        """The newest version any up replica is known to serve."""
        known = [r.known_version() for r in self.replicas if r.down_until <= time.time()]
        known = [v for v in known if v is not None]
        return max(known) if known else None


class EnvPool(_Peers):
    """Prompts and batch rewards from the env Spaces, round-robin (the trainer's one env scoring client)."""

    kind = "env"

    def _call(self, method: str, path: str, **kw) -> Any:
        tried: set[str] = set()
        while True:
            with self._lock:
                up = self._order(tried)
                p = self._take(up[0]) if up else None
            if p is None:
                raise NoHealthyEnvError("no healthy env Space (all failing or in back-off): " + self.describe_errors())
            try:
                resp = self._http.request(method, f"{p.url}{path}", **kw)
            except httpx.HTTPError as e:
                self._mark_bad(p, e)
                tried.add(p.url)
                continue
            if resp.status_code in _REQUEST_ERRORS:
                raise RolloutRequestError(f"env Space {p.url}{path}: HTTP {resp.status_code} {resp.text[:300]}")
            if resp.status_code >= 400:  # 401 (a wrong token) and 5xx: this Space, not the request
                self._mark_bad(p, RuntimeError(f"HTTP {resp.status_code} {resp.text[:200]}"))
                tried.add(p.url)
                continue
            self._mark_ok(p)
            return resp.json()

    def next_url(self) -> str:
        """An env Space for an OpenEnv session (round-robin over the up ones)."""
        with self._lock:
            up = self._order(set())
            if not up:
                raise NoHealthyEnvError("no healthy env Space: " + self.describe_errors())
            return self._take(up[0]).url

    def session_failed(self, url: str, err: Exception) -> None:
        self._mark_bad(next(p for p in self.peers if p.url == url), err)

    def session_ok(self, url: str) -> None:
        self._mark_ok(next(p for p in self.peers if p.url == url))

    def task_info(self, task: str) -> TaskInfo:
        for t in self._call("GET", "/v1/tasks")["tasks"]:
            if t["name"] == task:
                return TaskInfo.model_validate(t)
        raise ValueError(f"env Space has no task {task!r}")

    def prompts(self, task: str, *, n: int, seed: int | None = None) -> list[PromptOut]:
        params = {"n": n} if seed is None else {"n": n, "seed": seed}
        return [PromptOut.model_validate(p) for p in self._call("GET", f"/v1/tasks/{task}/prompts",
                                                                params=params)["prompts"]]

    def score(self, task: str, prompt_ids: list[str], completions: list[str]) -> list[float]:
        req = ScoreRequest(task=task, items=[ScoreItem(prompt_id=p, completion=c)
                                             for p, c in zip(prompt_ids, completions, strict=True)])
        res = ScoreResponse.model_validate(self._call("POST", "/v1/score", json=req.model_dump(exclude_none=True)))
        if len(res.rewards) != len(req.items):
            raise RuntimeError(f"env Space returned {len(res.rewards)} rewards for {len(req.items)} items")
        return [float(x) for x in res.rewards]
