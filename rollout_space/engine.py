"""The ``dws`` WeightTransferEngine (worker side): validate, write in place, read back. Registered lazily by
rollout_space/plugin.py; imported only inside vLLM workers that selected ``--weight-transfer-config
'{"backend": "dws"}'``.

Owns what happens to the served weights of one worker (one TP rank). Every file is validated *before* the first
write (names, shapes, index ranges, finite values, base version); then each changed tensor is written through the
:class:`~rollout_space.patchmap.PatchMap` -- O(changed) integer arithmetic and one ``index_copy_`` per placement,
one bounded chunk at a time, no full-shape staging -- and the written positions are read back and compared
(O(changed)). The full served-weights digest is *not* computed inside the pause on the sync path: the gateway
runs it after resume in chunks (``digest_start`` / ``digest_step``) and stops claiming the version on a mismatch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from rollout_space.patchmap import PatchMap, UnsupportedModelError, checkpoint_shapes, resolve_model_dir
from rollout_space.plugin import BACKEND
from rollout_space.prepared import CHUNK_ELEMENTS, PreparedReader, is_prepared
from rollout_space.updates import DwsInitInfo, DwsUpdateInfo, InconsistentWeightsError, PatchError
from shared.errors import FormatError

logger = logging.getLogger("dws.engine")


def _finite_bits(bits: torch.Tensor) -> bool:
    # bf16 NaN/Inf: the exponent field is all ones.
    return not bool(((bits.to(torch.int32) & 0x7F80) == 0x7F80).any())


class _MemoryDelta:
    """A delta decoded in this worker by ``shared.formats`` (the /update_weights route), with the same interface
    as :class:`PreparedReader`: tensors with a mode, chunks of (positions, int16 payload)."""

    def __init__(self, pf) -> None:
        from rollout_space.prepared import PreparedTensor

        self.version, self.base = pf.version, pf.base
        self._pf = pf
        self.tensors = {}
        for name, t in pf.tensors.items():
            if getattr(t, "needs_base_context", False):
                mode, count = "context", int(t.count)
            else:
                mode, count = ("values" if t.values is not None else "residual"), int(t.positions.size)
            self.tensors[name] = PreparedTensor(name, tuple(pf.shapes.get(name, ())), mode, count,
                                                getattr(t, "encoding", None))

    def chunks(self, name: str, chunk: int = CHUNK_ELEMENTS):
        t = self._pf.tensors[name]
        payload = t.values if t.values is not None else t.residual
        pos = np.asarray(t.positions, dtype=np.int64)
        pay = np.ascontiguousarray(payload).view(np.int16)
        for lo in range(0, pos.size, chunk):
            yield torch.from_numpy(pos[lo:lo + chunk]), torch.from_numpy(pay[lo:lo + chunk])

    def context_tensor(self, name: str):
        return self._pf.tensors[name]


class DwsWeightTransferEngine(WeightTransferEngine[DwsInitInfo, DwsUpdateInfo]):
    """Applies dws deltas / anchors from local files, in place, in checkpoint coordinates, on this rank."""

    dws_backend = True  # marker read by the worker extension

    init_info_cls = DwsInitInfo
    update_info_cls = DwsUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        t = time.perf_counter()
        model_dir = resolve_model_dir(str(self.model_config.model))
        self.map = PatchMap(model, checkpoint_shapes(model_dir))
        self._check_served_equals_checkpoint(model_dir)
        self.map_ms = round((time.perf_counter() - t) * 1e3, 1)
        if self.map.ignored:
            logger.info("dws: checkpoint tensors vLLM does not load: %s", self.map.ignored[:10])
        self.version: int | None = None
        self.consistent = True
        self.generation = 0  # bumped by every write: a digest that spans a write is void
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._resolved: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # path -> base-context decodes
        self._digest: dict[str, Any] | None = None

    def _check_served_equals_checkpoint(self, model_dir) -> None:
        """Once, at start: every mapped tensor must read back exactly as the checkpoint holds it. A backend that
        re-lays out weights after loading (vLLM CPU prepacks FusedMoE experts into a VNNI layout) leaves the map
        pointing at storage that no longer holds checkpoint values: patching it would corrupt the model, so the
        replica refuses to start, naming the tensors. One checkpoint tensor in memory at a time."""
        from safetensors import safe_open

        bad = []
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for name in sorted(fh.keys()):
                    if name not in self.map:
                        continue
                    want = fh.get_tensor(name).to(torch.bfloat16)
                    got = self.map.tensor(name).to("cpu")
                    if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
                        bad.append(name)
        if bad:
            raise UnsupportedModelError(
                f"{self.map.architecture}: after loading, vLLM serves {len(bad)} tensor(s) in a layout other than the "
                f"checkpoint's (e.g. {bad[:4]}); in-place patches cannot reach them -- on CPU, vLLM prepacks MoE "
                "expert weights")

    # ---- vLLM lifecycle ------------------------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: DwsInitInfo) -> None:
        if init_info.digest is not None:
            served = self.map.digest()
            if served != init_info.digest:
                raise InconsistentWeightsError(f"served digest {served} != declared {init_info.digest}")
        self.version = init_info.version
        self.consistent = True

    def start_weight_update(self) -> None:
        """No-op: patches are written in place (no layerwise reload)."""

    def finish_weight_update(self) -> None:
        """No-op: patches are written in place (no layerwise reload)."""

    def shutdown(self) -> None:
        pass

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU-only build.
        self.receive_weights(self.parse_update_info(update_info))
        self._sync_device()

    def receive_weights(self, info: DwsUpdateInfo) -> dict[str, Any]:
        return self.apply_file(info)

    @staticmethod
    def _sync_device() -> None:
        if torch.accelerator.current_accelerator() is not None:
            torch.accelerator.synchronize()

    # ---- one sync: every file of a version, in order (the dws_apply RPC) -----------------------------------------
    def apply(self, steps: list[dict[str, Any]]) -> dict[str, Any]:
        """Every file of a sync: all validated first (a bad later file -- e.g. one part of a version in parts --
        must not leave earlier ones half-applied), then all written, in order."""
        t0 = time.perf_counter()
        infos = [self.parse_update_info(s) for s in steps]
        checked, chain = [], (self.consistent, self.version)
        for info in infos:
            checked.append(self._check_file(info, chain))
            chain = (True, info.version)
        records = [self._write_file(info, *c) for info, c in zip(infos, checked)]
        self._sync_device()
        return {"steps": records, "version": self.version, "ms": round((time.perf_counter() - t0) * 1e3, 3)}

    def apply_file(self, info: DwsUpdateInfo) -> dict[str, Any]:
        return self._write_file(info, *self._check_file(info, (self.consistent, self.version)))

    def _check_file(self, info: DwsUpdateInfo, chain: tuple[bool, int | None]):
        """Validate one file against the state the weights will be in when it is written; writes nothing."""
        t0 = time.perf_counter()
        if not os.path.isfile(info.path):
            raise PatchError(f"no such file {info.path}")
        if info.kind == "delta":
            source = self._open_delta(info, chain)
            plan = self._validate_delta(source, info, chain)
        else:
            source, plan = None, self._validate_anchor(info)
        return source, plan, t0

    def _write_file(self, info: DwsUpdateInfo, source, plan, t0: float) -> dict[str, Any]:
        t1 = time.perf_counter()
        try:  # from here on weights change
            resolved = self._take_resolved(info.path, info.base) if info.kind == "delta" else {}
            self.generation += 1
            if info.kind == "delta":
                n_values, mismatched = self._write_delta(source, plan, info.path, resolved)
            else:
                n_values, mismatched = self._write_anchor(info.path, plan, info.rows)
            self._sync_device()
        except Exception as exc:
            self.consistent, self.version = False, None
            raise InconsistentWeightsError(f"applying {info.path} failed after writing started: {exc}") from exc
        if mismatched:
            self.consistent, self.version = False, None
            raise InconsistentWeightsError(f"{info.path}: {mismatched} written values do not read back")
        t2 = time.perf_counter()
        digest = None
        if info.verify:
            digest = self.map.digest()
            if info.expected_digest is not None and digest != info.expected_digest:
                self.consistent, self.version = False, None
                raise InconsistentWeightsError(
                    f"digest after {info.kind} v{info.version}: served {digest} != expected {info.expected_digest}")
        t3 = time.perf_counter()
        self.consistent, self.version = True, info.version
        self.last = {"kind": info.kind, "version": info.version, "base": info.base, "digest": digest,
                     "tensors": len(plan), "values": n_values, "readback": info.kind == "delta",
                     "validate_ms": round((t1 - t0) * 1e3, 3), "apply_ms": round((t2 - t1) * 1e3, 3),
                     "digest_ms": round((t3 - t2) * 1e3, 3)}
        self.history = (self.history + [self.last])[-32:]
        logger.info("dws: applied %s", self.last)
        return self.last

    # ---- deltas ----------------------------------------------------------------------------------------------
    def _open_delta(self, info: DwsUpdateInfo, chain: tuple[bool, int | None]):
        if not chain[0]:
            raise PatchError("weights are inconsistent after a failed update; apply an anchor first")
        if is_prepared(info.path):
            try:
                return PreparedReader(info.path)
            except FormatError as exc:
                raise PatchError(str(exc)) from None
        from shared.formats import read_patch_file

        try:  # the protocol's reader; TRL-layout files take their shapes from the served model
            pf = read_patch_file(info.path, shapes=self.map.shapes(), base=info.base)
        except FormatError as exc:
            raise PatchError(str(exc)) from None
        if pf.kind != "delta":
            raise PatchError(f"{info.path} is an anchor, update_info says delta")
        return _MemoryDelta(pf)

    def _validate_delta(self, src, info: DwsUpdateInfo, chain: tuple[bool, int | None]) -> list[str]:
        for attr in ("version", "base"):  # a file that states its own version/base must agree
            stated, asked = getattr(src, attr, None), getattr(info, attr)
            if stated is not None and asked is not None and stated != asked:
                raise PatchError(f"{info.path} is {attr} {stated}, update_info says {asked}")
        base = info.base if info.base is not None else src.base
        current = chain[1]
        # (a later part of the version in progress has the same base as its first part)
        if base is not None and current is not None and base != current and current != info.version:
            raise PatchError(f"delta base {base} != served version {current}")
        names = []
        for name, t in sorted(src.tensors.items()):
            if name not in self.map:
                raise PatchError(f"unknown tensor {name!r} (not a checkpoint tensor the served model loads)")
            if t.shape and tuple(t.shape) != self.map.shapes()[name]:
                raise PatchError(f"{name}: delta shape {list(t.shape)} != served {list(self.map.shapes()[name])}")
            if t.count == 0:
                continue
            if t.mode != "context":
                numel = self.map.numel(name)
                for pos, payload in src.chunks(name):  # positions are sorted (checked by the decoder)
                    if pos.numel() and (int(pos[0]) < 0 or int(pos[-1]) >= numel):
                        raise PatchError(f"{name}: positions out of range [0, {numel})")
                    if t.mode == "values" and not _finite_bits(payload):
                        raise PatchError(f"{name}: values contain NaN or Inf")
            names.append(name)
        return names

    def prepare(self, path: str) -> dict[str, Any]:
        """Decode the base-context tensors of a prepared file against the current weights (between engine steps,
        before the pause), so the pause only writes. Rejections here change nothing."""
        t0 = time.perf_counter()
        src = PreparedReader(path)
        out = {}
        for name, t in sorted(src.tensors.items()):
            if t.mode == "context":
                out[name] = self._decode_context(src, name)
        # Keyed by the file's identity too: the gateway reuses prepared-file names across syncs, and a decode made
        # for an earlier file (whose apply then failed) must never be written for a later one.
        self._resolved[path] = (self._identity(path), self.version, out)
        return {"tensors": len(out), "ms": round((time.perf_counter() - t0) * 1e3, 3)}

    @staticmethod
    def _identity(path: str) -> tuple[int, int, int]:
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _take_resolved(self, path: str, base: int | None) -> dict:
        """Base-context decodes made by prepare() for exactly this file, against the version it applies onto (the
        other parts of that version write other rows), else nothing: the pause then decodes them itself."""
        entry = self._resolved.pop(path, None)
        if entry is None:
            return {}
        identity, version, out = entry
        if identity != self._identity(path) or version is None or version != base:
            return {}
        return out

    def _decode_context(self, src, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        from shared.codec import bf16_bits, get_encoding

        base = self.map.tensor(name).reshape(-1)  # zero-copy at TP=1; merged across ranks at TP>1
        offset = src.tensors[name].offset
        try:
            if isinstance(src, _MemoryDelta):
                dec = src.context_tensor(name).decode(base)
            else:
                arrays, params, numel = src.context_arrays(name)
                base = base[offset: offset + numel]  # a part of a version in parts: its rows of the base
                dec = get_encoding(src.tensors[name].encoding).decode(arrays, params, numel, base_context=base)
            # residual encodings resolve against the same base, at the changed positions
            new = dec.resolve(bf16_bits(base)[dec.positions] if dec.needs_base else None)
        except FormatError as exc:
            raise PatchError(f"{name}: {exc}") from None
        vals = torch.from_numpy(np.ascontiguousarray(new).view(np.int16))
        if not _finite_bits(vals):
            raise PatchError(f"{name}: values contain NaN or Inf")
        return torch.from_numpy(np.asarray(dec.positions, dtype=np.int64) + offset), vals

    def _write_delta(self, src, names: list[str], path: str, resolved: dict) -> tuple[int, int]:
        n_values = mismatched = 0
        with torch.no_grad():
            for name in names:
                t = src.tensors[name]
                if t.mode == "context":
                    pos, vals = resolved.get(name) or self._decode_context(src, name)  # unprepared: in the pause
                    chunks, mode = [(pos, vals)], "values"
                else:
                    chunks, mode = src.chunks(name), t.mode
                for pos, payload in chunks:
                    n_values += int(pos.numel())
                    mismatched += self._write_chunk(name, pos, payload, mode)
        return n_values, mismatched

    def _write_chunk(self, name: str, pos: torch.Tensor, payload: torch.Tensor, mode: str) -> int:
        dev = self.map.placements[name][0].target.device
        pos = pos.to(dev)
        payload = payload.to(dev)
        bad = 0
        for pl, mask, dst in self.map.locations(name, pos):
            p = payload if mask is None else payload[mask]
            if mode == "residual":
                # new = base + residual (mod 2**16): int16 addition wraps exactly like the encoder's uint16 one
                p = pl.target.index_select(0, dst).view(torch.int16) + p
            new = p.view(torch.bfloat16)
            pl.target.index_copy_(0, dst, new)
            # Read back what vLLM now serves at those positions: proves the write reached the live tensor.
            back = pl.target.index_select(0, dst).view(torch.int16)
            bad += int((back != new.view(torch.int16)).sum())
        return bad

    # ---- anchors ---------------------------------------------------------------------------------------------
    def _validate_anchor(self, info: DwsUpdateInfo) -> list[str]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(info.path, framework="pt") as f:
                header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
                names = set(self.map.names())
                extra, missing = sorted(set(header) - names), sorted(names - set(header))
                if extra:
                    raise PatchError(f"anchor has unknown tensors {extra[:5]}")
                if missing and info.rows is None:  # a part holds some rows of some tensors; the digest checks all
                    raise PatchError(f"anchor lacks tensors {missing[:5]}")
                shapes = self.map.shapes()
                for name, (dtype, shape) in sorted(header.items()):
                    if dtype != "BF16":
                        raise PatchError(f"{name}: anchor dtype must be BF16, got {dtype}")
                    want = shapes[name]
                    if info.rows is not None:
                        if name not in info.rows:
                            raise PatchError(f"{name}: the part's rows are not given")
                        r0, r1 = info.rows[name]
                        if r1 > (want[0] if want else 1):
                            raise PatchError(f"{name}: rows [{r0}, {r1}) outside the tensor")
                        want = (r1 - r0, *want[1:]) if want else want
                    if shape != want:
                        raise PatchError(f"{name}: anchor shape {list(shape)} != served {list(want)}")
                if info.check_values:  # one tensor in memory at a time
                    for name in sorted(header):
                        if not _finite_bits(f.get_tensor(name).view(torch.int16)):
                            raise PatchError(f"{name}: anchor values contain NaN or Inf")
        except SafetensorError as exc:
            raise PatchError(f"{info.path}: unreadable safetensors file ({exc})") from None
        return sorted(header)

    def _write_anchor(self, path: str, names: list[str], rows: dict | None) -> tuple[int, int]:
        from safetensors import safe_open

        n = bad = 0
        with safe_open(path, framework="pt") as f, torch.no_grad():
            for name in names:  # one dense tensor in memory at a time
                x = f.get_tensor(name).contiguous()
                n += x.numel()
                if rows is not None:
                    # rows [r0, r1) of the full tensor: its flat elements r0*row ... r1*row, written sparsely
                    shape = self.map.shapes()[name]
                    row = math.prod(shape[1:]) if len(shape) > 1 else 1
                    flat = x.reshape(-1).view(torch.int16)
                    start = rows[name][0] * row
                    for lo in range(0, flat.numel(), CHUNK_ELEMENTS):
                        hi = min(flat.numel(), lo + CHUNK_ELEMENTS)
                        pos = torch.arange(start + lo, start + hi, dtype=torch.int64)
                        bad += self._write_chunk(name, pos, flat[lo:hi], "values")
                    continue
                for pl in self.map.placements[name]:
                    src = x.as_strided(pl.sizes, pl.src_strides, pl.src_offset)
                    pl.region().copy_(src.to(pl.target.device))
        return n, bad

    # ---- the served digest, in chunks between engine steps ---------------------------------------------------
    def digest_start(self) -> dict[str, Any]:
        from shared.digest import DigestBuilder

        self._digest = {"builder": DigestBuilder(), "names": self.map.names(), "i": 0,
                        "generation": self.generation, "ms": 0.0}
        return {"tensors": len(self._digest["names"])}

    def digest_step(self, budget_bytes: int) -> dict[str, Any]:
        d = self._digest
        if d is None:
            raise PatchError("no digest in progress (call dws_digest_start)")
        if d["generation"] != self.generation:
            self._digest = None
            raise PatchError("the weights changed while the digest was being computed")
        t0 = time.perf_counter()
        done_bytes = 0
        names = d["names"]
        while d["i"] < len(names) and done_bytes < budget_bytes:
            name = names[d["i"]]
            d["builder"].update(name, self.map.tensor(name))
            done_bytes += self.map.numel(name) * 2
            d["i"] += 1
        d["ms"] += (time.perf_counter() - t0) * 1e3
        if d["i"] < len(names):
            return {"done": False, "tensors_done": d["i"], "ms": round(d["ms"], 3)}
        self._digest = None
        return {"done": True, "digest": d["builder"].hexdigest(), "generation": self.generation,
                "version": self.version, "ms": round(d["ms"], 3)}

    def status(self) -> dict[str, Any]:
        return {"backend": BACKEND, "version": self.version, "consistent": self.consistent,
                "architecture": self.map.architecture, "tensors": len(self.map.names()),
                "tp_size": self.map.tp_size, "tp_rank": self.map.tp_rank, "map_ms": self.map_ms,
                "generation": self.generation, "last": self.last}


__all__ = ["DwsWeightTransferEngine", "UnsupportedModelError"]
