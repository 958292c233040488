"""Worker-side view of the served vLLM model in checkpoint (Hugging Face) coordinates.

vLLM serves fused / padded parameters (``qkv_proj`` = q|k|v stacked on the output dim, ``gate_up_proj`` = gate|up,
the vocabulary padded to a multiple of 64, ``lm_head`` sharing ``embed_tokens`` when tied). This module maps each
checkpoint tensor back onto the slice of the live vLLM parameter that holds it. At TP=1 every such slice is a run
of whole rows along dim 0, so each checkpoint tensor is a *zero-copy contiguous view* of the live parameter: reading
it (digest, gather) allocates nothing beyond the result, and writing it writes what vLLM serves.

Supported: decoder-only models built from vLLM's ``QKVParallelLinear`` / ``MergedColumnParallelLinear`` /
``VocabParallelEmbedding`` with plain 1:1 names elsewhere (Qwen2, Qwen3, Llama and their look-alikes), bf16,
tensor and pipeline parallel size 1. Anything else raises :class:`UnsupportedModelError` at construction time instead
of producing a silently wrong digest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Architectures whose vLLM implementation is known to map checkpoint names 1:1 except for the fused modules above.
SUPPORTED_ARCHITECTURES = frozenset(
    {"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"}
)

# Checkpoint sub-module names of the fused vLLM modules, in the order they are stacked on the output dim.
_DEFAULT_PACKED = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class UnsupportedModelError(RuntimeError):
    """The served model cannot be viewed in checkpoint coordinates by this module."""


@dataclass(frozen=True)
class CheckpointSlice:
    """Where one checkpoint tensor lives inside a live vLLM parameter: rows ``[row_start, row_stop)`` of dim 0."""

    name: str  # checkpoint name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]  # checkpoint shape
    param_name: str  # vLLM parameter name, e.g. "model.layers.0.self_attn.qkv_proj.weight"
    param: torch.Tensor
    row_start: int | None = None  # None: the whole parameter
    row_stop: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def view(self) -> torch.Tensor:
        """The live bf16 data of this checkpoint tensor, shaped like the checkpoint (a view, never a copy)."""
        data = self.param.data
        if self.row_start is not None:
            data = data[self.row_start : self.row_stop]
        if tuple(data.shape) != self.shape:
            data = data.view(self.shape)
        return data

    def flat(self) -> torch.Tensor:
        return self.view().view(-1)


def _parallel_sizes() -> tuple[int, int]:
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_world_size(), get_pp_group().world_size
    except Exception:  # not inside an initialized vLLM worker (unit use on a bare module)
        return 1, 1


def _rename_leaf(module_name: str, leaf: str, new_leaf: str, param_name: str) -> str:
    prefix = module_name[: -len(leaf)]
    return f"{prefix}{new_leaf}.{param_name}"


class CheckpointView:
    """Checkpoint-coordinate view of a served model (one worker, TP=1).

    ``names()`` are exactly the tensor names of the model's safetensors checkpoint that vLLM loads (a tied
    ``lm_head.weight`` is absent, as it is from the checkpoint).
    """

    def __init__(self, model: torch.nn.Module, *, check_architecture: bool = True) -> None:
        from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        arch = type(model).__name__
        if check_architecture and arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"checkpoint view supports {sorted(SUPPORTED_ARCHITECTURES)}, not {arch}"
            )
        tp, pp = _parallel_sizes()
        if tp != 1 or pp != 1:
            raise UnsupportedModelError(f"checkpoint view needs tensor/pipeline parallel size 1, got tp={tp} pp={pp}")

        packed = {**_DEFAULT_PACKED, **dict(getattr(model, "packed_modules_mapping", {}) or {})}
        slices: dict[str, CheckpointSlice] = {}
        seen: set[int] = set()

        def add(s: CheckpointSlice) -> None:
            if s.name in slices:
                raise UnsupportedModelError(f"two vLLM parameters map to checkpoint name {s.name!r}")
            slices[s.name] = s

        for mod_name, module in model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in seen:  # tied weights: the first name reached (embed_tokens) owns the storage
                    continue
                seen.add(id(param))
                full = f"{mod_name}.{pname}" if mod_name else pname
                if param.dtype != torch.bfloat16:
                    raise UnsupportedModelError(f"{full} is {param.dtype}; the dws digest is defined over bf16 weights")
                if param.numel() == 0:
                    raise UnsupportedModelError(
                        f"{full} is empty: vLLM's CPU GEMM dispatch removed it after packing (load the dws plugin "
                        "with DWS_CPU_KEEP_WEIGHTS unset/1 so linear weights stay live)"
                    )
                if not param.data.is_contiguous():
                    raise UnsupportedModelError(f"{full} is not contiguous")
                leaf = mod_name.rsplit(".", 1)[-1]
                rows = param.shape[0] if param.ndim else 0
                if isinstance(module, QKVParallelLinear):
                    subs = packed.get(leaf)
                    if not subs or len(subs) != 3:
                        raise UnsupportedModelError(f"no checkpoint names for fused module {mod_name}")
                    for sub, sid in zip(subs, ("q", "k", "v")):
                        off = module._get_shard_offset_mapping(sid)
                        size = module._get_shard_size_mapping(sid)
                        shape = (size, *param.shape[1:])
                        add(CheckpointSlice(_rename_leaf(mod_name, leaf, sub, pname), shape, full, param, off,
                                            off + size))
                    if module._get_shard_offset_mapping("total") != rows:
                        raise UnsupportedModelError(f"{full}: q|k|v sizes do not add up to {rows} rows")
                elif isinstance(module, MergedColumnParallelLinear):
                    subs = packed.get(leaf)
                    sizes = list(module.output_sizes)
                    if not subs or len(subs) != len(sizes) or sum(sizes) != rows:
                        raise UnsupportedModelError(f"cannot un-fuse {full} (subs={subs}, sizes={sizes})")
                    off = 0
                    for sub, size in zip(subs, sizes):
                        add(CheckpointSlice(_rename_leaf(mod_name, leaf, sub, pname), (size, *param.shape[1:]), full,
                                            param, off, off + size))
                        off += size
                elif isinstance(module, VocabParallelEmbedding):
                    if getattr(module, "num_added_embeddings", 0):
                        raise UnsupportedModelError(f"{full}: added (LoRA) vocabulary is not supported")
                    vocab = int(module.org_vocab_size)
                    add(CheckpointSlice(full, (vocab, *param.shape[1:]), full, param, 0, vocab))
                else:
                    add(CheckpointSlice(full, tuple(param.shape), full, param))
        self._slices = dict(sorted(slices.items()))
        self.architecture = arch

    # ---- reading -------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._slices)

    def __contains__(self, name: str) -> bool:
        return name in self._slices

    def __getitem__(self, name: str) -> CheckpointSlice:
        try:
            return self._slices[name]
        except KeyError:
            raise KeyError(f"unknown checkpoint tensor {name!r}") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s.shape for n, s in self._slices.items()}

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, bf16 tensor in checkpoint coordinates), sorted by name, one zero-copy view at a time."""
        for name, s in self._slices.items():
            yield name, s.view()

    def gather(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """Current bf16 values at flat row-major ``positions`` of checkpoint tensor ``name`` (a new small tensor)."""
        s = self[name]
        pos = torch.as_tensor(positions).to(device=s.param.device, dtype=torch.long).reshape(-1)
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= s.numel):
            raise IndexError(f"{name}: positions out of range [0, {s.numel})")
        return s.flat().index_select(0, pos)

    def digest(self) -> str:
        """The dws weights digest (shared/digest.py, version 1) over what this worker serves."""
        return weights_digest_stream(self.items())

    def check_against_checkpoint(self, model_dir: str | os.PathLike) -> list[str]:
        """Compare names and shapes with the safetensors headers in ``model_dir``; raise on a real mismatch.

        Returns checkpoint names that vLLM does not load (e.g. rotary caches), which are tolerated.
        """
        on_disk = read_checkpoint_shapes(model_dir)
        missing = [n for n in self._slices if n not in on_disk]
        wrong = [n for n, s in self._slices.items() if n in on_disk and tuple(on_disk[n]) != s.shape]
        if missing or wrong:
            raise UnsupportedModelError(
                f"served model does not match checkpoint {model_dir}: missing on disk {missing[:5]}, "
                f"shape mismatch {[(n, on_disk[n], self._slices[n].shape) for n in wrong[:5]]}"
            )
        return sorted(n for n in on_disk if n not in self._slices)


def weights_digest_stream(items) -> str:
    """Digest of (name, bf16 tensor) pairs that arrive in sorted name order (shared/digest.py definition)."""
    from shared.digest import DigestBuilder

    builder = DigestBuilder()
    for name, tensor in items:
        builder.update(name, tensor)
    return builder.hexdigest()


def read_checkpoint_shapes(model_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers of a local checkpoint folder (reads headers only)."""
    model_dir = Path(model_dir)
    shapes: dict[str, list[int]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = list(meta["shape"])
    return shapes
