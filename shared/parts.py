"""Part files: one version stored as several files, each holding a row slice of every tensor (docs/design.md §3).

A part file is an ordinary anchor or delta file (shared/formats.py) over the part's *local* tensors -- rows
[r0, r1) of each checkpoint tensor, shape (r1 - r0, *shape[1:]) -- so `safe_open` lists it and `read_patch_file`
decodes it; a delta part's positions are flat row-major indices *inside the slice*. Four header metadata keys say
which slice it is:

    dws_part    "k"             this part's index
    dws_parts   "n"             how many parts the version has
    dws_layout  "dim0-chunks"   how rows are split (shared/manifest.py `chunk_rows`: FSDP2's Shard(0))
    dws_slices  JSON {name: {"rows": [r0, r1], "shape": [full shape]}} for every tensor this part holds rows of
                (every tensor whose chunk k is not empty, changed or not; a 0-d tensor is in part 0 with rows [0, 1])

To apply a part to full tensors, element p of a delta part's tensor `name` is flat element r0 * row + p of the full
tensor (row = prod(shape[1:])); an anchor part's tensor `name` is rows [r0, r1) of the full tensor. This module owns
writing those headers and checking them against the manifest's model and layout before anything is applied, so that
overlapping, missing or misplaced slices are refused with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shared import stfile
from shared.errors import FormatError
from shared.formats import PatchFile, header_metadata, read_patch_file
from shared.manifest import LAYOUT_DIM0_CHUNKS, chunk_rows


@dataclass(frozen=True)
class PartInfo:
    """What a part file's header says about its slice."""

    index: int
    count: int
    layout: str
    slices: dict[str, tuple[int, int]]  # name -> rows [r0, r1) of the full tensor
    shapes: dict[str, tuple[int, ...]]  # name -> full shape

    def offset(self, name: str) -> int:
        """Flat index in the full tensor of the slice's first element."""
        shape = self.shapes[name]
        row = 1
        for s in shape[1:]:
            row *= s
        return self.slices[name][0] * row


def rows_of(shape: tuple[int, ...], index: int, count: int) -> tuple[int, int]:
    """Rows of a tensor of this full shape that part `index` of `count` holds (a 0-d tensor: one row, in part 0)."""
    return chunk_rows(shape[0] if shape else 1, index, count)


def expected_slices(shapes: Mapping[str, tuple[int, ...]], index: int, count: int) -> dict[str, tuple[int, int]]:
    """Every tensor whose chunk `index` is not empty, with its rows."""
    out = {}
    for name, shape in shapes.items():
        r0, r1 = rows_of(tuple(shape), index, count)
        if r1 > r0:
            out[name] = (r0, r1)
    return out


def local_shape(shape: tuple[int, ...], rows: tuple[int, int]) -> tuple[int, ...]:
    return (rows[1] - rows[0], *shape[1:]) if shape else ()


def part_metadata(shapes: Mapping[str, tuple[int, ...]], index: int, count: int) -> dict[str, str]:
    slices = expected_slices(shapes, index, count)
    return {
        "dws_part": str(index),
        "dws_parts": str(count),
        "dws_layout": LAYOUT_DIM0_CHUNKS,
        "dws_slices": json.dumps({n: {"rows": list(r), "shape": list(shapes[n])} for n, r in sorted(slices.items())},
                                 separators=(",", ":")),
    }


def add_metadata(blob: bytes, extra: Mapping[str, str]) -> bytes:
    """The same safetensors file with `extra` added to its header metadata: only the header is rewritten
    (`stfile.header_bytes`: the data offsets stay valid, the data stays aligned)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    meta = dict(header.get("__metadata__") or {})
    clash = set(meta) & set(extra)
    if clash:
        raise ValueError(f"header metadata already has {sorted(clash)}")
    meta.update(extra)
    header["__metadata__"] = meta
    return stfile.header_bytes(header) + blob[8 + n:]


def encode_anchor_part(tensors: Mapping[str, torch.Tensor], *, version: int, shapes: Mapping[str, tuple[int, ...]],
                       index: int, count: int) -> bytes:
    """An anchor part: `tensors` are this part's local slices (name -> rows of the full tensor), bf16."""
    want = expected_slices(shapes, index, count)
    if set(tensors) != set(want):
        raise ValueError(f"anchor part {index}/{count} must hold exactly the tensors its chunk covers")
    for name, t in tensors.items():
        if t.dtype != torch.bfloat16 or tuple(t.shape) != local_shape(tuple(shapes[name]), want[name]):
            raise ValueError(f"anchor part {index}/{count}: {name} is {tuple(t.shape)} {t.dtype}, expected "
                             f"{local_shape(tuple(shapes[name]), want[name])} bf16")
    meta = {"format": "pt", "dws_kind": "anchor", "version": str(version), **part_metadata(shapes, index, count)}
    return stfile.to_bytes(tensors, metadata=meta)


def is_part_file(path: str | Path) -> bool:
    """Whether a file's header says it is a part (for `dws inspect`); False for anything unreadable."""
    try:
        return "dws_part" in header_metadata(Path(path))
    except (FormatError, OSError):
        return False


def part_info(path: str | Path, *, shapes: Mapping[str, tuple[int, ...]] | None = None, index: int | None = None,
              count: int | None = None) -> PartInfo:
    """Read and check a part file's slice header (the header only: no tensor is loaded).

    With the model's `shapes` and the manifest's `index`/`count`, the slices must be exactly those the layout
    assigns to this part: a part that overlaps another, leaves rows out, or names an unknown tensor is refused here,
    before any of the version is applied."""
    path = Path(path)
    meta = header_metadata(path)
    where = path.name
    try:
        k, n = int(meta["dws_part"]), int(meta["dws_parts"])
        layout = meta["dws_layout"]
        raw = json.loads(meta["dws_slices"])
        assert isinstance(raw, dict)
        slices = {str(name): (int(v["rows"][0]), int(v["rows"][1])) for name, v in raw.items()}
        full = {str(name): tuple(int(s) for s in v["shape"]) for name, v in raw.items()}
        assert all(len(v["rows"]) == 2 for v in raw.values())
    except (KeyError, ValueError, TypeError, AssertionError, IndexError):
        raise FormatError(f"{where}: not a dws part file (its header lacks valid dws_part/dws_parts/dws_layout/"
                          "dws_slices)") from None
    if layout != LAYOUT_DIM0_CHUNKS:
        raise FormatError(f"{where}: unknown part layout {layout!r}")
    if not 0 <= k < n:
        raise FormatError(f"{where}: part {k} of {n} does not exist")
    if (index is not None and k != index) or (count is not None and n != count):
        raise FormatError(f"{where}: header says part {k} of {n}, the manifest lists it as part {index} of {count}")
    for name, (r0, r1) in slices.items():
        want = rows_of(full[name], k, n)
        if (r0, r1) != want:
            raise FormatError(f"{where}: {name} rows [{r0}, {r1}) are not part {k} of {n}'s rows {list(want)} "
                              "(overlapping or missing slices)")
    if shapes is not None:
        unknown = sorted(set(full) - set(shapes))
        if unknown:
            raise FormatError(f"{where}: unknown tensor(s) {unknown[:3]}")
        wrong = sorted(nm for nm in full if tuple(full[nm]) != tuple(shapes[nm]))
        if wrong:
            raise FormatError(f"{where}: {wrong[0]} has shape {list(full[wrong[0]])}, the model has "
                              f"{list(shapes[wrong[0]])}")
        missing = sorted(set(expected_slices(shapes, k, n)) - set(slices))
        if missing:
            raise FormatError(f"{where}: part {k} of {n} lacks the rows of {missing[:3]} (missing slices)")
    return PartInfo(k, n, layout, slices, full)


def read_part(path: str | Path, *, shapes: Mapping[str, tuple[int, ...]] | None, index: int | None = None,
              count: int | None = None, version: int | None = None, base: int | None = None) -> tuple[PatchFile,
                                                                                                         PartInfo]:
    """Decode one part file and check it: slices as `part_info` checks them, every stored tensor inside its slice
    with the slice's shape, version and base as the manifest says."""
    path = Path(path)
    info = part_info(path, shapes=shapes, index=index, count=count)
    pf = read_patch_file(path)
    if version is not None and pf.version != version:
        raise FormatError(f"{path.name}: file says v{pf.version}, manifest says v{version}")
    if base is not None and pf.kind == "delta" and pf.base != base:
        raise FormatError(f"{path.name}: file says base v{pf.base}, manifest says v{base}")
    for name, shape in pf.shapes.items():
        if name not in info.slices:
            raise FormatError(f"{path.name}: tensor {name!r} is stored but not among the part's slices")
        want = local_shape(info.shapes[name], info.slices[name])
        if tuple(shape) != want:
            raise FormatError(f"{path.name}: {name} slice has shape {tuple(shape)}, its rows make {want}")
    if pf.kind == "anchor" and set(pf.shapes) != set(info.slices):
        missing = sorted(set(info.slices) - set(pf.shapes))[:3]
        raise FormatError(f"{path.name}: anchor part lacks tensors {missing}")
    return pf, info


def apply_part(state: MutableMapping[str, torch.Tensor], pf: PatchFile, info: PartInfo) -> list:
    """Apply one decoded part to a dict of *full* bf16 tensors in place; returns what `undo_part` needs to put the
    touched elements back (a delta's old values at its positions: O(changed) memory).

    Each tensor's slice is a contiguous view of the full tensor (dim-0 rows of a row-major tensor), so the delta
    decoder writes straight into the full tensor's storage."""
    from shared.follower import apply_to_state
    from shared.formats import bits

    views: dict[str, torch.Tensor] = {}
    for name in pf.shapes:
        full = state.get(name)
        if full is None or full.dtype != torch.bfloat16 or tuple(full.shape) != info.shapes[name]:
            raise FormatError(f"part {info.index}: tensor {name!r} is not in the state with shape "
                              f"{list(info.shapes[name])} bf16")
        if not full.is_contiguous():
            state[name] = full = full.contiguous()
        r0, r1 = info.slices[name]
        views[name] = full[r0:r1] if full.dim() else full
    if pf.kind == "anchor":
        for name, t in pf.tensors.items():
            views[name].copy_(t)
        return []
    for name, dec in list(pf.tensors.items()):
        if dec.needs_base_context:  # codec v2 (ctx) decodes against the slice's current values, before any write
            pf.tensors[name] = dec.decode(bits(views[name]).reshape(-1))
    undo = [(views[name], dec.positions.copy(), bits(views[name]).reshape(-1)[dec.positions].copy())
            for name, dec in pf.tensors.items()]
    apply_to_state(views, pf)  # validates every tensor first, then writes: an error leaves `state` untouched
    return undo


def undo_part(undo: list) -> None:
    """Put back what `apply_part` overwrote (used when a later part of the same version turns out bad)."""
    from shared.formats import bits

    for view, positions, old in undo:
        bits(view).reshape(-1)[positions] = old


__all__ = ["PartInfo", "add_metadata", "apply_part", "encode_anchor_part", "expected_slices", "is_part_file",
           "local_shape", "part_info", "part_metadata", "read_part", "rows_of", "undo_part"]
