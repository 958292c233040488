"""`RemoteRolloutWorker`: TRL AsyncGRPOTrainer's `rollout_worker=` extension point (`RolloutWorkerProtocol`), fed by
the rollout replicas and the env Spaces over HTTPS.

Owns continuous generation: `max_inflight` producer threads, each taking the next dataset row (a seeded permutation
per epoch), playing one GRPO group on whichever replica is next (`rollouts.GroupPlayer`), scoring it on an env Space,
and putting its `RolloutSample`s on `rollout_buffer`, a bounded queue (a full queue makes generation wait: there is
no point producing samples that will be dropped as stale before the trainer gets to them). So at most
`max_inflight` generation requests are in flight across all replicas at any moment, and the trainer never waits for
a whole batch to be generated after it asks: samples are there already, or arrive one group at a time.

Versions: the trainer tells the worker its current version (`update_model_version`); a producer about to start a
group when no replica is known to serve a version inside the staleness bound first nudges the replicas and waits a
little (bounded) instead of generating samples TRL would drop. The samples carry the replicas' own version tags; TRL
drops a sample whose tag lags its version by more than `max_staleness` when it consumes it.

Health (`check_health`, called by TRL while it waits for samples): raises when a producer died of an unexpected
error, or when no replica or no env Space has answered for `stale_after_s` seconds. Transient failures are not
errors: a replica or env that fails is skipped for `retry_after_s` and retried (remote.py).
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from trainer_space.remote import EnvPool, NoHealthyEnvError, NoHealthyReplicaError, ReplicaPool, RolloutRequestError
from trainer_space.rollouts import UNTAGGED, GroupPlayer, to_rollout_samples

log = logging.getLogger("dws.trainer.worker")


@dataclass(kw_only=True)
class WorkerStats:
    """What the worker did, for the dashboard and the benchmark (read under the worker's lock)."""

    groups: int = 0
    samples: int = 0
    untagged_groups: int = 0
    request_errors: int = 0
    waiting_for_fresh_s: float = 0.0  # producers holding back until a replica serves a version within the bound
    backpressure_s: float = 0.0  # producers blocked on a full queue (generation ahead of training)
    generate_s: float = 0.0
    score_s: float = 0.0
    versions: dict[int, int] = field(default_factory=dict)  # group version -> groups
    turns: list[int] = field(default_factory=list)  # multi-turn: turns of each episode
    episode_returns: list[float] = field(default_factory=list)
    last_error: str | None = None


class RemoteRolloutWorker:
    def __init__(self, *, player: GroupPlayer, rows: list[dict], max_inflight: int, queue_size: int,
                 max_staleness: int, seed: int = 0, fresh_wait_s: float = 5.0) -> None:
        if not rows:
            raise ValueError("the rollout worker needs at least one dataset row")
        self.player = player
        self.pool: ReplicaPool = player.pool
        self.envs: EnvPool = player.envs
        self.rollout_buffer: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self.metrics_queue: queue.Queue = queue.Queue(maxsize=4096)
        self.max_inflight = max(1, max_inflight)
        self.max_staleness = max_staleness
        self.fresh_wait_s = fresh_wait_s
        self.stats = WorkerStats()
        self._rows = rows
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._lock = threading.Lock()
        self._group_ids = itertools.count()
        self._version = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failure: BaseException | None = None
        self._started_at = 0.0
        self._status_refreshed = 0.0

    # ------------------------------------------------------------------------------------------- protocol
    def start(self) -> None:
        if self._threads:
            return
        self._started_at = time.time()
        for i in range(self.max_inflight):
            th = threading.Thread(target=self._produce, name=f"dws-rollout-{i}", daemon=True)
            th.start()
            self._threads.append(th)
        log.info("rollout worker: %d request(s) in flight across %d replica(s), %d env Space(s), queue of %d "
                 "samples", self.max_inflight, len(self.pool.replicas), len(self.envs.peers),
                 self.rollout_buffer.maxsize)

    def stop(self) -> None:
        self._stop.set()
        # Producers blocked on a full queue must see the stop: free one slot per producer.
        for _ in self._threads:
            try:
                self.rollout_buffer.get_nowait()
            except queue.Empty:
                break
        for th in self._threads:
            th.join(timeout=5)  # daemon threads: one stuck in a long request must not hold the run's exit
        self._threads = []
        self.player.executor.shutdown(wait=False, cancel_futures=True)

    def update_model_version(self, model_version: int) -> None:
        self._version = int(model_version)

    def check_health(self, stale_after_s: float) -> None:
        if self._failure is not None:
            raise RuntimeError(f"rollout worker failed: {type(self._failure).__name__}: {self._failure}") \
                from self._failure
        since = max(self._started_at, 0.0)
        now = time.time()
        for peers, what in ((self.pool, "rollout replica"), (self.envs, "env Space")):
            last = max(peers.last_ok(), since)
            if now - last > stale_after_s and peers.none_up():
                raise RuntimeError(f"no {what} has answered for {now - last:.0f}s (limit {stale_after_s:.0f}s): "
                                   + peers.describe_errors())

    # ------------------------------------------------------------------------------------------- producing
    def _next_row(self) -> dict:
        with self._lock:
            if not self._order:
                self._order = list(range(len(self._rows)))
                self._rng.shuffle(self._order)
            return self._rows[self._order.pop()]

    def _wait_for_fresh(self) -> None:
        """Hold back (bounded) while no replica is known to serve a version the trainer would still accept."""
        need = self._version - self.max_staleness
        t0 = time.perf_counter()
        while not self._stop.is_set() and time.perf_counter() - t0 < self.fresh_wait_s:
            fresh = self.pool.freshest()
            if fresh is not None and fresh >= need:
                break
            with self._lock:
                refresh = time.monotonic() - self._status_refreshed > 0.5
                if refresh:
                    self._status_refreshed = time.monotonic()
            if refresh:  # one producer polls for all of them
                self.pool.nudge()
                self.pool.refresh_status()
            time.sleep(0.1)
        waited = time.perf_counter() - t0
        if waited > 0.05:
            with self._lock:
                self.stats.waiting_for_fresh_s += waited

    def _produce(self) -> None:
        while not self._stop.is_set():
            row = self._next_row()
            try:
                self._wait_for_fresh()
                group = self.player.play(row, min_version=self._version - self.max_staleness)
            except (NoHealthyReplicaError, NoHealthyEnvError, ConnectionError, OSError) as e:
                # Every peer is failing right now: wait for the back-off; check_health decides when it is fatal.
                with self._lock:
                    self.stats.last_error = f"{type(e).__name__}: {e}"[:300]
                self._stop.wait(min(2.0, self.pool.retry_after_s))
                continue
            except RolloutRequestError as e:
                # The request itself was refused (e.g. an episode beyond the context): skip this row, keep going.
                with self._lock:
                    self.stats.request_errors += 1
                    self.stats.last_error = str(e)[:300]
                log.warning("skipping a %s group: %s", row.get("task"), e)
                continue
            except Exception as e:  # a bug or a broken peer protocol: surface it through check_health
                log.exception("rollout producer failed")
                self._failure = e
                self._stop.set()
                return
            self._deliver(group)

    def _deliver(self, group) -> None:
        samples = to_rollout_samples(group, next(self._group_ids))
        with self._lock:
            st = self.stats
            st.groups += 1
            st.samples += len(samples)
            st.generate_s += group.generate_s
            st.score_s += group.score_s
            st.versions[group.version] = st.versions.get(group.version, 0) + 1
            if group.version == UNTAGGED:
                st.untagged_groups += 1
            if group.multi_turn:
                st.turns += [s.turns for s in group.samples]
                st.episode_returns += [float(s.reward) for s in group.samples]
        metrics = {"rollout/generate_s": group.generate_s, "rollout/score_s": group.score_s}
        try:
            self.metrics_queue.put_nowait(metrics)
        except queue.Full:  # the trainer stopped draining metrics; never block generation on it
            pass
        t0 = time.perf_counter()
        for s in samples:
            while not self._stop.is_set():
                try:
                    self.rollout_buffer.put(s, timeout=0.5)
                    break
                except queue.Full:
                    continue
        blocked = time.perf_counter() - t0
        with self._lock:
            self.stats.backpressure_s += blocked

    def snapshot(self) -> dict:
        with self._lock:
            st = self.stats
            return {"groups": st.groups, "samples": st.samples, "untagged_groups": st.untagged_groups,
                    "request_errors": st.request_errors, "waiting_for_fresh_s": round(st.waiting_for_fresh_s, 3),
                    "backpressure_s": round(st.backpressure_s, 3), "generate_s": round(st.generate_s, 3),
                    "score_s": round(st.score_s, 3), "versions": {str(k): v for k, v in sorted(st.versions.items())},
                    "turns": list(st.turns), "episode_returns": list(st.episode_returns),
                    "last_error": st.last_error, "queue_size": self.rollout_buffer.qsize(),
                    "max_inflight": self.max_inflight, "trainer_version": self._version}


def make_executor(max_inflight: int, group_size: int) -> ThreadPoolExecutor:
    """Threads for the turns of concurrent episodes: every member of every in-flight group may wait on a replica."""
    return ThreadPoolExecutor(max_workers=max(4, max_inflight * group_size), thread_name_prefix="dws-turn")
