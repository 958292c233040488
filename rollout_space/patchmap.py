"""Where every checkpoint element lives in the served vLLM model, learned from the model's own loader.

Owns the mapping between checkpoint (Hugging Face) coordinates -- the coordinates of the bucket's deltas, anchors
and digest -- and the live tensors of *this* vLLM worker, for any architecture vLLM loads and any tensor-parallel
rank. Why learned rather than written down: fused q|k|v and gate|up, padded vocabularies, tied embeddings, MoE
expert stacks and TP sharding are all decided by each model's ``load_weights`` and its weight loaders; hand-coding
them per architecture (what the first checkpoint view did, for four architectures) goes silently wrong on the
fifth.

How: once, at engine start, each checkpoint tensor ``X`` is handed to ``model.load_weights`` as an *unpopulated*
``torch.empty`` (virtual memory, never touched) while ``torch.Tensor.copy_`` is replaced by a spy that records
``(destination, source)`` and writes nothing. vLLM's sparse-patch contract says a loader's final write is one
same-shaped ``copy_`` of a view of the checkpoint tensor (vllm/model_executor/model_loader/checkpoint_weight_patch
.py); a source that aliases ``X``'s storage therefore tells us, through its strides and offset, exactly which
checkpoint elements land at which destination elements (the destination's strides). That is a :class:`Placement`.
A loader that computes (source not a view of ``X``) or writes some other way is refused at start-up, by name,
instead of being patched wrongly later.

With placements, a sparse update is O(changed): flat checkpoint positions -> (in-shard mask, flat storage offsets)
by integer arithmetic, then one ``index_copy_`` per placement -- no full-shape staging tensor (vLLM's own
``load_checkpoint_weight_patches`` builds a NaN-filled tensor of the full checkpoint shape for every patched
tensor). Reading a checkpoint tensor back (digest, base context) is a zero-copy view when the tensor is one
contiguous run of one live tensor (every tensor of the usual models at TP=1); otherwise it is assembled, one
checkpoint tensor at a time, and at TP > 1 merged across ranks over the TP group's CPU (gloo) group.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dws.patchmap")


class UnsupportedModelError(RuntimeError):
    """The served model cannot be addressed in checkpoint coordinates (named tensors, and why)."""


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Placement:
    """A strided region of checkpoint tensor ``name`` (``src_*``, in the tensor's own flat row-major numbering) that
    this rank serves at a strided region (``dst_*``) of ``target`` -- a flat bf16 alias of a live tensor's whole
    storage. ``dims[k]`` is the checkpoint dimension that view dimension ``k`` walks (``None`` for size-1 dims)."""

    name: str
    shape: tuple[int, ...]
    target: torch.Tensor
    sizes: tuple[int, ...]
    src_offset: int
    src_strides: tuple[int, ...]
    dst_offset: int
    dst_strides: tuple[int, ...]
    dims: tuple[int | None, ...]
    whole: bool  # the region is the entire checkpoint tensor, stored contiguously: dst = dst_offset + p

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask of the positions inside this region or None for all, flat storage offsets of those positions)."""
        if self.whole:
            return None, positions + self.dst_offset
        cstrides = _contiguous_strides(self.shape)
        start = [(self.src_offset // cs) % max(s, 1) for cs, s in zip(cstrides, self.shape)]
        coords = [(positions // cs) % max(s, 1) for cs, s in zip(cstrides, self.shape)]
        mask = torch.ones_like(positions, dtype=torch.bool)
        walked = {j for j in self.dims if j is not None}
        dst = torch.full_like(positions, self.dst_offset)
        for k, j in enumerate(self.dims):
            if j is None:
                continue
            i = coords[j] - start[j]
            mask &= (i >= 0) & (i < self.sizes[k])
            dst += i * self.dst_strides[k]
        for j in range(len(self.shape)):
            if j not in walked and self.shape[j] > 1:
                mask &= coords[j] == start[j]
        if bool(mask.all()):
            return None, dst
        return mask, dst[mask]

    def region(self) -> torch.Tensor:
        """The live values of this region, shaped ``sizes`` (a view)."""
        return self.target.as_strided(self.sizes, self.dst_strides, self.dst_offset)


def _flat_alias(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view over the whole storage of ``t`` (writes through it are writes to what vLLM serves)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return t.as_strided((n,), (1,), 0)


def _tp() -> tuple[int, int, object | None]:
    try:
        from vllm.distributed.parallel_state import get_tp_group

        g = get_tp_group()
        return g.world_size, g.rank_in_group, g.cpu_group
    except Exception:  # not inside an initialised vLLM worker
        return 1, 0, None


class PatchMap:
    """Checkpoint name -> placements on this rank, for every checkpoint tensor the served model loads."""

    def __init__(self, model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.architecture = type(model).__name__
        self.tp_size, self.tp_rank, self._group = _tp()
        self.placements: dict[str, list[Placement]] = {}
        self.ignored: list[str] = []  # checkpoint tensors vLLM does not load (e.g. a tied lm_head, rotary caches)
        device = next(model.parameters()).device
        covered: dict[int, int] = {}  # storage data_ptr -> elements placed
        problems: list[str] = []
        for name in sorted(shapes):
            shape = tuple(int(s) for s in shapes[name])
            try:
                pls = self._probe(model, name, shape, device)
            except UnsupportedModelError as exc:
                problems.append(str(exc))
                continue
            if not pls:
                self.ignored.append(name)
                continue
            self.placements[name] = pls
            for pl in pls:
                key = pl.target.untyped_storage().data_ptr()
                covered[key] = covered.get(key, 0) + pl.numel
        # A parameter that no checkpoint tensor reached was loaded some other way than copy_ (or not at all): the
        # digest and every patch would silently skip it.
        missed = sorted(n for n, p in model.named_parameters()
                        if p.numel() and p.untyped_storage().data_ptr() not in covered)
        if missed:
            problems.append(f"parameters no checkpoint tensor is copied into: {missed[:8]}")
        if problems:
            raise UnsupportedModelError(f"{self.architecture}: cannot map checkpoint coordinates: "
                                        + "; ".join(problems[:8]))
        self._shapes = {n: pls[0].shape for n, pls in self.placements.items()}

    # ---- learning the layout ----------------------------------------------------------------------------------
    @staticmethod
    def _probe(model, name: str, shape: tuple[int, ...], device) -> list[Placement]:
        probe = torch.empty(shape, dtype=torch.bfloat16, device=device)  # never written or read: no resident pages
        base_ptr, base_bytes = probe.untyped_storage().data_ptr(), probe.untyped_storage().nbytes()
        records: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = torch.Tensor.copy_

        def spy(dst, src, non_blocking=False):
            records.append((dst, src))
            return dst

        torch.Tensor.copy_ = spy  # the hazard: any copy_ during the probe must write nothing into live weights
        try:
            with torch.no_grad():
                model.load_weights([(name, probe)])
        except Exception as exc:  # noqa: BLE001 -- a loader that cannot take an untouched tensor: say which
            raise UnsupportedModelError(f"{name}: load_weights failed on a probe ({type(exc).__name__}: {exc})") \
                from None
        finally:
            torch.Tensor.copy_ = original
        out = []
        cstrides = _contiguous_strides(shape)
        for dst, src in records:
            if not isinstance(src, torch.Tensor) or src.numel() == 0:
                continue
            if src.untyped_storage().data_ptr() != base_ptr or src.untyped_storage().nbytes() != base_bytes:
                raise UnsupportedModelError(f"{name}: the loader writes a computed tensor, not a view of the "
                                            "checkpoint tensor")
            if tuple(dst.shape) != tuple(src.shape) or dst.dtype != torch.bfloat16 or src.dtype != torch.bfloat16:
                raise UnsupportedModelError(f"{name}: loader copies {tuple(src.shape)} {src.dtype} into "
                                            f"{tuple(dst.shape)} {dst.dtype}")
            dims: list[int | None] = []
            for size, stride in zip(src.shape, src.stride()):
                if size == 1:
                    dims.append(None)
                    continue
                js = [j for j, cs in enumerate(cstrides) if cs == stride and shape[j] > 1]
                if len(js) != 1 or js[0] in dims:
                    raise UnsupportedModelError(f"{name}: cannot invert the loader's view (strides {src.stride()})")
                dims.append(js[0])
            whole = (tuple(src.shape) == shape and src.storage_offset() == 0 and src.is_contiguous()
                     and dst.is_contiguous())
            out.append(Placement(name, shape, _flat_alias(dst), tuple(src.shape), src.storage_offset(),
                                 tuple(src.stride()), dst.storage_offset(), tuple(dst.stride()), tuple(dims), whole))
        return out

    # ---- reading ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._shapes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def numel(self, name: str) -> int:
        return math.prod(self._shapes[name])

    def locations(self, name: str, positions: torch.Tensor) -> list[tuple[Placement, torch.Tensor | None,
                                                                          torch.Tensor]]:
        """For flat checkpoint ``positions`` (int64, on the weights' device): [(placement, mask, storage offsets)]
        for every placement holding some of them on this rank."""
        out = []
        for pl in self.placements[name]:
            mask, dst = pl.locate(positions)
            if dst.numel():
                out.append((pl, mask, dst))
        return out

    def _merge(self, bits: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        """Across TP ranks: each element from the lowest rank that holds it (replicated tensors: every rank)."""
        if self.tp_size == 1:
            if not bool(held.all()):
                raise UnsupportedModelError("some checkpoint elements are not served by this worker")
            return bits
        import torch.distributed as dist

        owner = torch.where(held, torch.tensor(self.tp_rank, dtype=torch.int32),
                            torch.tensor(self.tp_size, dtype=torch.int32))
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=self._group)
        if bool((owner == self.tp_size).any()):
            raise UnsupportedModelError("some checkpoint elements are served by no tensor-parallel rank")
        contrib = torch.where(owner == self.tp_rank, bits, torch.zeros((), dtype=torch.int32))
        dist.all_reduce(contrib, op=dist.ReduceOp.SUM, group=self._group)
        return contrib

    def tensor(self, name: str) -> torch.Tensor:
        """Checkpoint tensor ``name`` as served, in checkpoint shape: a zero-copy view when it is one contiguous
        run on this rank (TP=1, the usual layouts), otherwise one assembled copy (merged across TP ranks; every
        rank must call this together then)."""
        pls = self.placements[name]
        shape = self._shapes[name]
        if self.tp_size == 1 and len(pls) == 1 and pls[0].whole:
            pl = pls[0]
            return pl.target[pl.dst_offset: pl.dst_offset + pl.numel].view(shape)
        n = math.prod(shape)
        dev = pls[0].target.device
        bits = torch.zeros(n, dtype=torch.int32, device="cpu")
        held = torch.zeros(n, dtype=torch.bool, device="cpu")
        for pl in pls:
            region = pl.region().to("cpu").view(torch.int16).to(torch.int32) & 0xFFFF
            bits.as_strided(pl.sizes, pl.src_strides, pl.src_offset).copy_(region)
            held.as_strided(pl.sizes, pl.src_strides, pl.src_offset).fill_(True)
        merged = self._merge(bits, held)
        merged = torch.where(merged > 32767, merged - 65536, merged).to(torch.int16)
        return merged.view(torch.bfloat16).view(shape).to(dev)

    def gather(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """Served bf16 values at flat checkpoint ``positions`` (merged across TP ranks), as a small CPU tensor."""
        positions = positions.to(torch.int64)
        bits = torch.zeros(positions.numel(), dtype=torch.int32)
        held = torch.zeros(positions.numel(), dtype=torch.bool)
        dev = self.placements[name][0].target.device
        for pl, mask, dst in self.locations(name, positions.to(dev)):
            vals = pl.target.index_select(0, dst).to("cpu").view(torch.int16).to(torch.int32) & 0xFFFF
            if mask is None:
                bits[:], held[:] = vals, True
            else:
                m = mask.to("cpu")
                bits[m], held[m] = vals, True
        merged = self._merge(bits, held)
        return torch.where(merged > 32767, merged - 65536, merged).to(torch.int16).view(torch.bfloat16)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._shapes:
            yield name, self.tensor(name)

    def digest(self) -> str:
        from shared.digest import DigestBuilder

        builder = DigestBuilder()
        for name, t in self.items():
            builder.update(name, t)
        return builder.hexdigest()


def checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers of a local checkpoint folder (headers only), through the
    protocol's header reader where it has one."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def resolve_model_dir(model: str) -> Path:
    """A local folder, or a Hub id already in the local cache (vLLM downloaded it to start)."""
    if os.path.isdir(model):
        return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]))


__all__ = ["PatchMap", "Placement", "UnsupportedModelError", "checkpoint_shapes", "resolve_model_dir"]
