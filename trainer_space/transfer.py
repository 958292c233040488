"""`BucketWeightTransfer`: TRL AsyncGRPOTrainer's `weight_transfer=` extension point (`WeightTransferProtocol`), with
the bucket in place of NCCL.

TRL calls, at every weight sync (train begin, then every `weight_sync_steps` optimizer steps): `pause()`,
`send_weights(iterator of (name, tensor))`, `resume()`, then raises its model version by one. Here:
- `send_weights` hands the tensors to the shared `Publisher`: the blocking part is a bf16 snapshot (NaN/Inf refused
  there: `NonFiniteWeightsError` stops the run before anything is written); diff against the last *published*
  version, encode and upload run on the publisher's thread. The version published is the one TRL's model version
  becomes at the end of this sync (`first_version` + number of syncs so far), so replica version tags and TRL's
  staleness arithmetic use the same numbers.
- `pause` / `resume` do nothing: replicas are never stopped, they follow the bucket on their own (a publish
  completion nudges them to look now instead of at their next poll).
- Frozen parameters (`--trainable`) are not in TRL's iterator (it sends only what trains); they never change, so
  they are added from the model as it was at start, and the bucket always holds whole models.
- The first sync after a restart re-sends the weights the bucket already holds as its latest version (they were
  restored from it): that version is not published again.
- Under torchrun (trainer_space/sharded.py) every rank has one, over a `ShardedPublisher`, and is handed its own
  local shards (DTensors, never gathered); the publish is then a collective that every rank enters at the same sync.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch

from shared.publisher import PublishReport, Publisher

log = logging.getLogger("dws.trainer.transfer")


class BucketWeightTransfer:
    def __init__(self, publisher: Publisher, *, first_version: int, frozen: dict[str, torch.Tensor] | None = None,
                 names: list[str] | None = None, on_published: Callable[[PublishReport], None] | None = None,
                 on_failed: Callable[[BaseException], None] | None = None, rank: int | None = None) -> None:
        self.publisher = publisher
        self.rank = rank  # set when this is one rank of a sharded run
        self.next_version = first_version
        self.frozen = dict(frozen or {})
        self.names = names  # the model's parameter order, for a stable tensor order in every version
        self.on_published, self.on_failed = on_published, on_failed
        self.last_version: int | None = None  # newest version handed to the publisher (or already in the bucket)
        self.syncs = 0
        self.snapshot_s: list[float] = []
        self.error: BaseException | None = None

    def init_weight_transfer(self) -> None:
        log.info("weights go through the bucket %s; first version v%d", self.publisher.bucket.address,
                 self.next_version)

    def pause(self) -> None:
        """Nothing to pause: replicas keep serving and pick the new version up from the bucket."""

    def resume(self) -> None:
        """Nothing to resume (see `pause`)."""

    def send_weights(self, iterator: Iterator[tuple[str, torch.Tensor]]) -> None:
        version = self.next_version
        self.next_version += 1
        self.syncs += 1
        # Consume the whole iterator even when nothing is published: under FSDP2 each step of it is a collective
        # (full_tensor) that every rank must take part in.
        sent = dict(iterator)
        latest = self.publisher.latest_version
        if latest is not None and version <= latest:
            if self.syncs != 1:
                raise RuntimeError(f"v{version} is already in the bucket (latest v{latest}) after {self.syncs} syncs")
            log.info("v%d is already in the bucket (restored from it): not published again", version)
            self.last_version = version
            return
        tensors = {**self.frozen, **sent}
        if self.names is not None:
            tensors = {n: tensors[n] for n in self.names if n in tensors}
        t0 = time.perf_counter()
        fut = self.publisher.publish(tensors, version)  # NonFiniteWeightsError here stops the run
        self.snapshot_s.append(time.perf_counter() - t0)
        if self.rank is not None:
            from trainer_space.sharded import dump_rows

            dump_rows(tensors.items(), version, self.rank)  # a test hook; does nothing unless its variable is set
        self.last_version = version
        fut.add_done_callback(self._done)

    def publish_now(self, named_tensors) -> int:
        """Publish outside TRL's sync schedule (the last steps of a run when steps % weight_sync_steps != 0)."""
        self.send_weights(iter(list(named_tensors)))
        return self.last_version

    def _done(self, fut) -> None:
        try:
            rep = fut.result()
        except BaseException as e:  # surfaced again by the next publish()/flush(); shown on the dashboard now
            if self.on_failed:
                self.on_failed(e)
            return
        part = "" if self.rank is None else f" (rank {self.rank}'s part)"
        log.info("published v%d %s%s: changed %d/%d (sparsity %.4f), %d bytes, encode %.3fs, upload %.3fs",
                 rep.version, "+".join(rep.kinds), part, rep.changed, rep.total, rep.sparsity, rep.bytes, rep.encode_s,
                 rep.upload_s)
        if self.on_published:
            self.on_published(rep)

    def destroy(self) -> None:
        """Wait for every queued version to be committed. TRL calls this in a `finally`: raising here would hide the
        error that ended training, so a publish failure is kept in `error` for the caller to raise."""
        try:
            self.publisher.flush()
        except Exception as e:
            log.error("publishing failed: %s", e)
            self.error = e
