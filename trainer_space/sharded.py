"""The trainer under `torchrun --nproc_per_node N -m trainer_space`: FSDP2 (`fully_shard`) training with TRL's
AsyncGRPOTrainer, every rank publishing its own rows of each version through `shared.sharded.ShardedPublisher`.

Owns what differs from a single-process run, and nothing else (train.py keeps the run itself):

- `Ranks`: this process's place in the job, read from the variables torchrun (or `accelerate launch`) sets.
- `refusal`: configurations that cannot work, stated in one line before anything starts (`dws train` exits 2).
- `start_process_group` / `broadcast`: the gloo group that exists before TRL's accelerator, so that the publisher
  (a collective) and the prompt rows (read from the env Spaces by rank 0 only) are set up first.
- `shard_model`: `fully_shard` on every decoder layer and the root over a 1-D mesh of all ranks -- FSDP2's
  `Shard(0)`, which is the bucket's "dim0-chunks" part layout, so rank k's local shard *is* part k. accelerate
  shards with FSDP2 only on GPUs (on CPU its `MULTI_CPU` mode would wrap the model in DDP, which refuses DTensor
  parameters), so the model is sharded here, after TRL built it, and marked with accelerate's own
  `_is_accelerate_prepared` flag: `prepare` then registers it as it is. Launch with torchrun (or, on GPUs,
  `accelerate launch --multi_gpu`, which starts torchrun's launcher); `accelerate launch --cpu` starts MPI processes
  without WORLD_SIZE/RANK and is refused.
- `sharded_trainer_class`: AsyncGRPOTrainer with one method overridden, `_streaming_iter`. That is the narrowest
  hook: TRL's weight sync (`_sync_weight_merged`) streams `param.full_tensor()` -- an all-gather of every parameter
  -- to rank 0's `weight_transfer.send_weights`, while the other ranks walk the same iterator only to take part in
  those gathers. Overridden, it gathers nothing: rank 0's iterator yields the local DTensor parameters into TRL's own
  `send_weights` call, and on every other rank, where TRL holds no weight transfer, walking the iterator hands the
  same parameters to this rank's `BucketWeightTransfer`. So every rank calls `ShardedPublisher.publish` (a collective)
  once per sync, at the same point of TRL's sync (between its two barriers), with only its own rows. Everything else
  of TRL's sync -- pause/resume, the version counter, the rollout worker's version -- is untouched.

Which rank does what: rank 0 alone talks to the replicas and env Spaces (TRL runs the rollout worker and reads the
rollout queue on the main process only, and accelerate's dispatching data loader scatters each micro-batch row i to
rank i), serves the dashboard and holds the bucket's owner lease (rank 0 of the publisher); every rank trains its
shard and publishes its own part.

Restart: each rank rebuilds its own rows of the bucket's latest version from the parts (ShardedPublisher, proven
against the manifest digest across ranks) and copies them into its local shards. A different rank count (or a
history written by a single process) is re-split from the committed files (ShardedPublisher), so no rank reads more
than the files that overlap its rows.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dws.trainer.sharded")

#: TEST HOOK: save each rank's published rows (bf16) per version into this folder (the tests' reference weights).
DUMP_ROWS_VAR = "DWS_TEST_DUMP_ROWS"
#: FAULT INJECTION for tests only: "RANK:VERSION" -- that rank stores half of its delta part of that version, then
#: SIGKILLs itself (a machine lost mid-upload).
KILL_VAR = "DWS_TEST_FAULT_KILL_RANK_AT"


#: Set by MPI launchers (what `accelerate launch --cpu --num_processes N` uses); torchrun sets WORLD_SIZE instead.
MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun / accelerate launch set WORLD_SIZE, RANK and LOCAL_RANK; a plain `python -m` sets none."""

        def num(name: str, default: int) -> int:
            raw = os.environ.get(name, "")
            try:
                return int(raw) if raw.strip() else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not an integer (it is set by torchrun)") from None

        world = num("WORLD_SIZE", 1)
        rank = num("RANK", 0)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} WORLD_SIZE={world} is not a valid place in a job")
        return cls(rank=rank, world=world, local_rank=num("LOCAL_RANK", rank))


def refusal(*, world: int, batch_size: int, trainable: str | None) -> str | None:
    """Why this configuration cannot run on `world` ranks (None: it can). One line, for `dws train` to exit 2."""
    if world <= 1:
        mpi = max((int(v) for k in MPI_SIZE_VARS if (v := os.environ.get(k, "").strip()).isdigit()), default=1)
        if mpi > 1:
            # Each MPI process would otherwise run as a whole single-process trainer on the same bucket.
            return (f"started as one of {mpi} MPI processes (e.g. `accelerate launch --cpu --num_processes {mpi}`) "
                    "without torchrun's WORLD_SIZE/RANK: start the ranks with `torchrun --nproc_per_node N -m "
                    "trainer_space`")
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return ("accelerate's own FSDP (--use_fsdp / ACCELERATE_USE_FSDP) is not used here: the trainer shards the "
                "model itself with FSDP2; launch with torchrun, or `accelerate launch` without --use_fsdp")
    if batch_size % world:
        return (f"the batch ({batch_size} samples = --prompts-per-step x --group-size) does not split over {world} "
                f"ranks; make it a multiple of {world}")
    if trainable:
        # FSDP2 groups a layer's parameters into one flat all-gather; a frozen subset in it is untested here.
        return "--trainable (a frozen subset of the weights) is supported by the single-process trainer only"
    return None


def start_process_group(ranks: Ranks):
    """The job's default process group, before TRL builds its accelerator (which then uses it as it is): gloo on
    CPU, NCCL where CUDA is present. Returns a gloo group for this module's own small object broadcasts."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() != ranks.world or dist.get_rank() != ranks.rank:
        raise ValueError(f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                         f"says {ranks.rank} of {ranks.world}")
    return dist.new_group(backend="gloo")


def broadcast(obj: Any, group) -> Any:
    """Rank 0's object on every rank (pickled over the gloo group)."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _layer_classes(model) -> set[str]:
    # transformers names the repeated block of each architecture in `_no_split_modules` (Qwen3DecoderLayer, ...).
    return set(getattr(model, "_no_split_modules", None) or [])


def shard_model(model, ranks: Ranks) -> int:
    """FSDP2 over all ranks: `fully_shard` on each decoder layer, then the root (embeddings, final norm, head).
    Every parameter becomes a DTensor placed Shard(0) on a 1-D mesh. Returns the number of layers sharded."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (ranks.world,))
    names = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # accelerate's own marker of a model that needs no further wrapping: without it, `prepare` on CPU wraps the
    # model in DDP, which refuses DTensor parameters (and on a GPU without accelerate's FSDP plugin, likewise).
    model._is_accelerate_prepared = True
    log.info("rank %d/%d: FSDP2 over %d %s layer(s) + root; each rank holds %d of %d parameter elements",
             ranks.rank, ranks.world, len(layers), "/".join(sorted(names)) or "decoder",
             sum(p.to_local().numel() for p in model.parameters()), sum(p.numel() for p in model.parameters()))
    return len(layers)


def load_rows(model, rows: dict) -> None:
    """Copy this rank's rows (bf16, from the bucket) into its local shards; nothing is gathered."""
    import torch

    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(rows))
    if missing:
        raise RuntimeError(f"the bucket's rows lack parameters the model has: {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            local = p.to_local()
            if tuple(local.shape) != tuple(rows[name].shape):
                raise RuntimeError(f"{name}: rows {tuple(rows[name].shape)} from the bucket, local shard "
                                   f"{tuple(local.shape)}")
            local.copy_(rows[name].to(local.dtype))


def dump_rows(named_params, version: int, rank: int) -> None:
    """TEST HOOK (DWS_TEST_DUMP_ROWS): this rank's rows as published, the tests' reference."""
    folder = os.environ.get(DUMP_ROWS_VAR)
    if not folder:
        return
    import torch

    rows = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().to(torch.bfloat16).clone()
            for n, p in named_params}
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(rows, Path(folder) / f"v{version}.rank{rank}.pt")


def killing_bucket(bucket, ranks: Ranks):
    """FAULT INJECTION (DWS_TEST_FAULT_KILL_RANK_AT=RANK:VERSION): on that rank, the upload of its delta part of that
    version stores half the file and SIGKILLs the process -- what a machine lost mid-upload leaves behind."""
    raw = os.environ.get(KILL_VAR, "")
    if not raw:
        return bucket
    import signal

    from shared.manifest import part_path

    rank, version = (int(x) for x in raw.split(":"))
    if rank != ranks.rank:
        return bucket
    target = part_path(version, rank, ranks.world, anchor=False)
    original = bucket.upload

    def upload(local_path, path):
        if path == target:
            data = Path(local_path).read_bytes()
            half = Path(local_path).with_suffix(".half")
            half.write_bytes(data[: len(data) // 2])
            original(half, path)
            log.warning("FAULT INJECTION: rank %d stored half of %s and kills itself", rank, path)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(local_path, path)

    bucket.upload = upload
    return bucket


def sharded_trainer_class():
    """AsyncGRPOTrainer whose weight sync hands every rank's local shards to its own BucketWeightTransfer instead of
    all-gathering full tensors for rank 0 (see the module docstring). `dws_transfer` must be set on every rank."""
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    if not callable(getattr(AsyncGRPOTrainer, "_streaming_iter", None)):
        raise RuntimeError("this TRL's AsyncGRPOTrainer has no _streaming_iter: the sharded weight sync is written "
                           "for trl 1.16")

    class ShardedAsyncGRPOTrainer(AsyncGRPOTrainer):
        dws_transfer = None  # BucketWeightTransfer of this rank

        def _streaming_iter(self):
            # Local DTensor parameters, as they are: no full_tensor(), so nothing is gathered on any rank.
            params = list(self.accelerator.unwrap_model(self.model).named_parameters())
            if self.accelerator.is_main_process:
                yield from params  # into TRL's own weight_transfer.send_weights (this rank's transfer)
            else:
                # TRL walks this iterator on the other ranks only to join the gathers; here it publishes this rank's
                # part (the publish is a collective with rank 0's, which runs inside send_weights right now).
                self.dws_transfer.send_weights(iter(params))

    return ShardedAsyncGRPOTrainer


__all__ = ["DUMP_ROWS_VAR", "KILL_VAR", "Ranks", "broadcast", "dump_rows", "killing_bucket", "load_rows",
           "refusal", "shard_model", "sharded_trainer_class", "start_process_group"]
