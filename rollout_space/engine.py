"""The ``dws`` WeightTransferEngine (worker side): validate, write in place, read back. Registered lazily by
rollout_space/plugin.py; imported only inside vLLM workers that selected ``--weight-transfer-config
'{"backend": "dws"}'``.

Owns what happens to the served weights of one worker (one TP rank). Every file is validated *before* the first
write (names, shapes, index ranges, finite values, base version); then each changed tensor is written through the
:class:`~rollout_space.patchmap.PatchMap` and the written positions are read back and compared (O(changed)).

Everything that is not a write happens before the pause, between engine steps, in ``prepare`` (the ``dws_prepare``
RPC, in budgeted steps so no engine step waits long): it reads the gateway's prepared file chunk by chunk, checks
every position (range, order) and value (finite), decodes base-context tensors and resolves residuals against the
served weights, and turns checkpoint positions into storage offsets of each live tensor (the PatchMap's integer
arithmetic). The result -- per placement, (storage offsets, new bf16 bits) -- goes to a *plan* file beside the
prepared one (pread back in chunks, never resident: memory stays bounded by a chunk). Inside the pause a planned
file is only: read a chunk of the plan, scatter it into the live tensor, read those positions back (one compiled
loop on CPU, ``index_copy_`` + ``index_select`` elsewhere). A plan is used only for the very file it was made from
(inode, size, mtime) and only if no weight was written since it was made (``generation``); otherwise the pause
falls back to doing that work itself. The full served-weights digest is *not* computed inside the pause on the
sync path: the gateway runs it after resume in chunks (``digest_start`` / ``digest_step``) and stops claiming the
version on a mismatch.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from rollout_space.patchmap import PatchMap, Placement, UnsupportedModelError, checkpoint_shapes, resolve_model_dir
from rollout_space.plugin import BACKEND
from rollout_space.prepared import CHUNK_ELEMENTS, PreparedReader, is_prepared
from rollout_space.updates import DwsInitInfo, DwsUpdateInfo, InconsistentWeightsError, PatchError
from shared.errors import FormatError

logger = logging.getLogger("dws.engine")

# Changed elements the plan handles at once (and so the size of one in-pause write segment). It bounds the plan's
# temporaries -- locating positions in a fused tensor holds ~6 int64 arrays of this length -- and what malloc keeps
# resident afterwards. Measured on the 41.6 M model: 512 K-element slices raised the worker's peak RSS by 16 MB on
# its first delta sync (20 % of the model's bytes). The pause does not pay for the smaller segments (in isolation,
# 23.2 M changed of 596 M on 2 threads: 75 ms with 64 K segments, 89 ms with 512 K); the plan, before the pause,
# takes longer (more Python per element: 0.36 -> 0.6-0.7 s at 0.6B).
PLAN_SLICE = 1 << 16
PLAN_SLICE_VAR = "DWS_TEST_PLAN_SLICE"  # TEST HOOK: a smaller slice, so a tiny test model crosses slice boundaries


def _plan_slice() -> int:
    from shared.envvars import env_value

    size = env_value(PLAN_SLICE_VAR, PLAN_SLICE, int)
    if size < 1:
        raise ValueError(f"{PLAN_SLICE_VAR}={size}: must be >= 1")
    return size


def _slices(pos: torch.Tensor, vals: torch.Tensor, size: int):
    """(positions, values) of a decoded tensor, ``size`` at a time. A function, not a generator expression in the
    caller: the caller's loop rebinds names like ``pos``/``vals``, and a lazy expression would slice those."""
    for lo in range(0, pos.numel(), size):
        yield pos[lo:lo + size], vals[lo:lo + size]


def _finite_bits(bits: torch.Tensor) -> bool:
    # bf16 NaN/Inf: the exponent field is all ones.
    return not bool(((bits.to(torch.int32) & 0x7F80) == 0x7F80).any())


def _compile_scatter():
    """The in-pause write on CPU: scatter new bf16 bits to storage offsets, then read each block back (while it is
    still in cache) and count mismatches. One pass over the offsets instead of torch's index_copy_ + index_select +
    compare (three passes and two temporaries). Compiled eagerly, for both offset widths, when the engine starts:
    a JIT compile must never land inside a pause."""
    import numba

    @numba.njit(["int64(int16[::1], int32[::1], int16[::1])", "int64(int16[::1], int64[::1], int16[::1])"],
                nogil=True, boundscheck=False)
    def scatter_readback(target, idx, vals):
        bad = 0
        n = idx.size
        for lo in range(0, n, 8192):
            hi = min(n, lo + 8192)
            for i in range(lo, hi):
                target[idx[i]] = vals[i]
            for i in range(lo, hi):
                if target[idx[i]] != vals[i]:
                    bad += 1
        return bad

    return scatter_readback


def _cores() -> int:
    """CPU cores this worker may run on (vLLM may pin it): how many threads the in-pause writes use."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(8, os.cpu_count() or 1))


@dataclass
class _Segment:
    """One chunk of one placement in a plan file: ``count`` storage offsets (int32 or int64) at ``idx_at`` and
    as many int16 bf16 bit patterns at ``vals_at`` (byte offsets in the plan file)."""

    placement: Placement
    count: int
    idx_dtype: Any
    idx_at: int
    vals_at: int


@dataclass
class _Plan:
    """A prepared file turned into writes for this rank (see the module docstring)."""

    path: str
    identity: tuple[int, int, int]
    generation: int  # self.generation when made: any later write voids it
    served: int | None  # the version served when made
    version: int
    base: int
    plan_path: str
    segments: list[_Segment] = field(default_factory=list)
    changed: int = 0
    context: int = 0  # base-context tensors decoded here
    ms: float = 0.0

    def discard(self) -> None:
        try:
            os.unlink(self.plan_path)
        except OSError:
            pass


def _pread_into(fd: int, buf: np.ndarray, at: int) -> np.ndarray:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], at + done)
        if got <= 0:
            raise InconsistentWeightsError("a plan file ended early")
        done += got
    return buf


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
        self._plans: dict[str, _Plan] = {}  # prepared-file path -> its finished plan
        self._preparing: tuple[_Plan, Any] | None = None  # a plan being made, and its step generator
        self._digest: dict[str, Any] | None = None
        self._scatter = _compile_scatter() if self.map.placements and self._on_cpu() else None
        # Threads for the in-pause writes on CPU, made now rather than inside the first pause.
        self._pool = None
        if self._scatter is not None and _cores() > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(_cores(), thread_name_prefix="dws-write")
        self._plan_slice = _plan_slice()
        self.warm = self._warm_up()

    def _warm_up(self) -> dict[str, Any]:
        """Pay, once at start, what the first sync would otherwise pay inside its plan and pause: loading the
        codec's compiled decoders (numba's cache: tens of MB of code, measured +20 MB on the first sync of the 41.6 M
        model). A warm-up failure is logged and shown in ``status``, never fatal: the first sync then loads the code
        itself (and any real decode error is reported there)."""
        t, ok = time.perf_counter(), True
        try:
            from shared.codec import warm_up

            warm_up()
        except Exception as exc:  # noqa: BLE001 -- a warm-up only
            ok = False
            logger.warning("dws: warming the decoders failed (%s); the first sync loads them", exc)
        ms = round((time.perf_counter() - t) * 1e3, 1)
        threads = _cores() if self._pool else 1
        logger.info("dws: decoders warm in %.0f ms, %d write thread(s)", ms, threads)
        return {"ok": ok, "ms": ms, "write_threads": threads}

    def _on_cpu(self) -> bool:
        return all(pl.target.device.type == "cpu" for pls in self.map.placements.values() for pl in pls)

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
        must not leave earlier ones half-applied), then all written, in order. A file with a plan from
        ``prepare`` made at the current generation is only checked against the version chain here: its chunks were
        validated when the plan was made."""
        t0 = time.perf_counter()
        try:
            infos = [self.parse_update_info(s) for s in steps]
            checked, chain = [], (self.consistent, self.version)
            for i, info in enumerate(infos):
                # Parts of one version (same version and base) write disjoint rows: a plan made for any of them
                # before the pause stays valid while the earlier parts are written.
                plan = self._usable_plan(info, all(p.version == info.version and p.base == info.base
                                                   for p in infos[:i]))
                checked.append(self._check_file(info, chain, plan))
                chain = (True, info.version)
            records = [self._write_file(info, *c) for info, c in zip(infos, checked)]
            self._sync_device()
        finally:
            self._drop_plans()  # one sync's plans: never reused by a later one
        return {"steps": records, "version": self.version, "ms": round((time.perf_counter() - t0) * 1e3, 3)}

    def apply_file(self, info: DwsUpdateInfo) -> dict[str, Any]:
        try:
            return self._write_file(info, *self._check_file(info, (self.consistent, self.version),
                                                            self._usable_plan(info, True)))
        finally:
            self._drop_plans()

    def _check_file(self, info: DwsUpdateInfo, chain: tuple[bool, int | None], plan: "_Plan | None" = None):
        """Validate one file against the state the weights will be in when it is written; writes nothing."""
        t0 = time.perf_counter()
        if not os.path.isfile(info.path):
            raise PatchError(f"no such file {info.path}")
        if info.kind == "delta":
            source = self._open_delta(info, chain)
            names = self._validate_delta(source, info, chain, scan=plan is None)
        else:
            source, names = None, self._validate_anchor(info)
        return source, names, t0, plan

    def _write_file(self, info: DwsUpdateInfo, source, names, t0: float, plan: "_Plan | None" = None) -> dict:
        t1 = time.perf_counter()
        try:  # from here on weights change
            self.generation += 1
            if info.kind == "delta":
                n_values, mismatched = (self._write_plan(plan) if plan is not None
                                        else self._write_delta(source, names))
            else:
                n_values, mismatched = self._write_anchor(info.path, names, info.rows)
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
                     "tensors": len(names), "values": n_values, "readback": info.kind == "delta",
                     "planned": plan is not None, "validate_ms": round((t1 - t0) * 1e3, 3),
                     "apply_ms": round((t2 - t1) * 1e3, 3), "digest_ms": round((t3 - t2) * 1e3, 3)}
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

    def _check_header(self, src, path: str) -> list[str]:
        """Names and shapes of a delta against the served model (O(tensors)); the tensors that change."""
        names = []
        for name, t in sorted(src.tensors.items()):
            if name not in self.map:
                raise PatchError(f"unknown tensor {name!r} (not a checkpoint tensor the served model loads)")
            if t.shape and tuple(t.shape) != self.map.shapes()[name]:
                raise PatchError(f"{name}: delta shape {list(t.shape)} != served {list(self.map.shapes()[name])}")
            if t.count:
                names.append(name)
        return names

    def _validate_delta(self, src, info: DwsUpdateInfo, chain: tuple[bool, int | None], *,
                        scan: bool = True) -> list[str]:
        for attr in ("version", "base"):  # a file that states its own version/base must agree
            stated, asked = getattr(src, attr, None), getattr(info, attr)
            if stated is not None and asked is not None and stated != asked:
                raise PatchError(f"{info.path} is {attr} {stated}, update_info says {asked}")
        base = info.base if info.base is not None else src.base
        current = chain[1]
        # (a later part of the version in progress has the same base as its first part)
        if base is not None and current is not None and base != current and current != info.version:
            raise PatchError(f"delta base {base} != served version {current}")
        names = self._check_header(src, info.path)
        if scan:  # no plan: every chunk is checked here, inside the pause
            for name in names:
                t = src.tensors[name]
                if t.mode == "context":
                    continue
                for pos, payload in src.chunks(name):
                    self._check_chunk(name, t.mode, pos, payload)
        return names

    def _check_chunk(self, name: str, mode: str, pos: torch.Tensor, payload: torch.Tensor,
                     after: int = -1) -> int:
        """Positions inside the tensor, strictly increasing (also across chunks: ``after`` is the previous chunk's
        last); values finite. Returns the chunk's last position."""
        if not pos.numel():
            return after
        numel = self.map.numel(name)
        if int(pos[0]) <= after or int(pos[0]) < 0 or int(pos[-1]) >= numel:
            raise PatchError(f"{name}: positions out of range [0, {numel}) or out of order")
        if pos.numel() > 1 and bool((pos[1:] <= pos[:-1]).any()):
            raise PatchError(f"{name}: positions are not sorted and unique")
        if mode == "values" and not _finite_bits(payload):
            raise PatchError(f"{name}: values contain NaN or Inf")
        return int(pos[-1])

    # ---- before the pause: a prepared file becomes a plan ------------------------------------------------------
    def prepare(self, path: str, budget: int | None = None) -> dict[str, Any]:
        """Make (or continue making) the plan of prepared file ``path``, about ``budget`` changed elements per call
        (None: all). Runs between engine steps, before the pause. A rejection here changes no weight and leaves no
        plan: the apply of that file then fails the same checks before writing anything."""
        t0 = time.perf_counter()
        if self._preparing is not None and not self._continues(self._preparing[0], path):
            self._preparing[1].close()  # another file (or the weights changed): the unfinished plan is dropped
            self._preparing[0].discard()
            self._preparing = None
        if self._preparing is None:
            old = self._plans.pop(path, None)
            if old is not None:
                old.discard()
            try:
                src = PreparedReader(path)
            except FormatError as exc:
                raise PatchError(str(exc)) from None
            plan = _Plan(path, src.identity, self.generation, self.version, src.version, src.base,
                         f"{path}.rank{self.map.tp_rank}.plan")
            self._preparing = (plan, self._plan_steps(src, plan))
        plan, steps = self._preparing
        done, spent = True, 0
        try:
            for n in steps:
                spent += n
                if budget is not None and spent >= budget:
                    done = False
                    break
        except BaseException:
            plan.discard()
            self._preparing = None
            raise
        plan.ms += (time.perf_counter() - t0) * 1e3
        if done:
            self._preparing = None
            self._plans[path] = plan
        return {"done": done, "tensors": plan.context, "changed": plan.changed, "segments": len(plan.segments),
                "ms": round(plan.ms, 3)}

    def _continues(self, plan: _Plan, path: str) -> bool:
        """An unfinished plan may be continued only for the same file (a sync that failed half-way through its
        preparation leaves one behind, and the next sync reuses the file name) and the same weights."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (plan.path == path and plan.identity == (st.st_ino, st.st_size, st.st_mtime_ns)
                and plan.generation == self.generation)

    def _plan_steps(self, src: PreparedReader, plan: _Plan):
        """Generator: validate ``src`` chunk by chunk and write its plan; yields the elements of each chunk."""
        if not self.consistent:
            raise PatchError("weights are inconsistent after a failed update; apply an anchor first")
        if self.version is not None and src.base != self.version:
            raise PatchError(f"delta base {src.base} != served version {self.version}")
        names = self._check_header(src, src.path)
        fd = os.open(plan.plan_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        at = 0
        try:
            with torch.no_grad():
                for name in names:
                    t = src.tensors[name]
                    if t.mode == "context":
                        decoded = self._decode_context(src, name)
                        plan.context += 1
                        chunks, mode = _slices(*decoded, self._plan_slice), "values"
                    else:
                        chunks, mode = src.chunks(name, self._plan_slice), t.mode
                    last = -1
                    for pos, payload in chunks:
                        last = self._check_chunk(name, mode, pos, payload, last)
                        dev = self.map.placements[name][0].target.device
                        payload = payload.to(dev)
                        for pl, mask, dst in self.map.locations(name, pos.to(dev)):
                            p = payload if mask is None else payload[mask]
                            if mode == "residual":
                                # new = base + residual (mod 2**16), resolved now against the served base: int16
                                # addition wraps exactly like the encoder's uint16 one
                                p = pl.target.index_select(0, dst).view(torch.int16) + p
                                if not _finite_bits(p):
                                    raise PatchError(f"{name}: resolved values contain NaN or Inf")
                            idx = dst.to("cpu").numpy()
                            if pl.target.numel() < 2**31:
                                idx = idx.astype(np.int32)
                            vals = p.to("cpu").contiguous().numpy()
                            seg = _Segment(pl, int(idx.size), idx.dtype, at, at + idx.nbytes)
                            for arr in (idx, vals):
                                os.write(fd, memoryview(np.ascontiguousarray(arr)).cast("B"))
                            at += idx.nbytes + vals.nbytes
                            plan.segments.append(seg)
                        plan.changed += int(pos.numel())
                        yield int(pos.numel())
        finally:
            os.close(fd)
            src.close()

    def _usable_plan(self, info: DwsUpdateInfo, chain_ok: bool) -> _Plan | None:
        """The plan made for exactly this file (same inode, size, mtime), at the current generation (no weight
        written since), for the version and base this update says; else None (the pause does the work)."""
        plan = self._plans.get(info.path)
        if plan is None or info.kind != "delta" or not chain_ok or not self.consistent:
            return None
        try:
            st = os.stat(info.path)
        except OSError:
            return None
        if ((st.st_ino, st.st_size, st.st_mtime_ns) != plan.identity or plan.generation != self.generation
                or plan.served != self.version or (info.base is not None and info.base != plan.base)
                or (info.version is not None and info.version != plan.version)):
            return None
        return plan

    def _drop_plans(self) -> None:
        for plan in self._plans.values():
            plan.discard()
        self._plans.clear()

    def _write_plan(self, plan: _Plan) -> tuple[int, int]:
        """Inside the pause: read the plan chunk by chunk into reused buffers, scatter, read back. On CPU the
        segments (disjoint storage: positions are unique per tensor, tensors do not overlap) are shared among
        threads, one per core this worker may use: the compiled loop and pread both release the GIL."""
        segments = plan.segments
        workers = min(len(segments), _cores()) if self._scatter is not None else 1
        if workers <= 1:
            return self._write_segments(plan.plan_path, segments)
        jobs: list[list[_Segment]] = [[] for _ in range(workers)]
        loads = [0] * workers
        for seg in sorted(segments, key=lambda g: -g.count):  # largest first onto the least loaded thread
            k = loads.index(min(loads))
            jobs[k].append(seg)
            loads[k] += seg.count
        results = list(self._pool.map(lambda job: self._write_segments(plan.plan_path, job), jobs))
        return sum(r[0] for r in results), sum(r[1] for r in results)

    def _write_segments(self, plan_path: str, segments: list[_Segment]) -> tuple[int, int]:
        n_values = bad = 0
        most = max((s.count for s in segments), default=0)
        bufs: dict[np.dtype, np.ndarray] = {}
        vals_buf = np.empty(most, np.int16)
        fd = os.open(plan_path, os.O_RDONLY)
        try:
            with torch.no_grad():
                for seg in segments:
                    dt = np.dtype(seg.idx_dtype)
                    if dt not in bufs:
                        bufs[dt] = np.empty(most, dt)
                    idx = _pread_into(fd, bufs[dt][:seg.count], seg.idx_at)
                    vals = _pread_into(fd, vals_buf[:seg.count], seg.vals_at)
                    bad += self._scatter_values(seg.placement, idx, vals)
                    n_values += seg.count
        finally:
            os.close(fd)
        return n_values, bad

    def _scatter_values(self, pl: Placement, idx: np.ndarray, vals: np.ndarray) -> int:
        """Write int16 bf16 bits ``vals`` at storage offsets ``idx`` of ``pl.target``; read them back; mismatches."""
        if self._scatter is not None and pl.target.device.type == "cpu":
            if idx.size and (int(idx[0]) < 0 or int(idx.max()) >= pl.target.numel()):
                raise PatchError("a plan offset is outside its live tensor")  # the compiled loop has no bounds check
            return int(self._scatter(pl.target.detach().view(torch.int16).numpy(), idx, vals))
        dev = pl.target.device
        dst = torch.from_numpy(idx).to(dev, torch.int64)
        new = torch.from_numpy(vals).to(dev).view(torch.bfloat16)
        pl.target.index_copy_(0, dst, new)
        back = pl.target.index_select(0, dst).view(torch.int16)
        return int((back != new.view(torch.int16)).sum())

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

    def _write_delta(self, src, names: list[str]) -> tuple[int, int]:
        """Without a plan (a later version of a multi-version sync, or the /update_weights route): everything in
        the pause -- base-context decode, residual resolution, locating -- then the same writes."""
        n_values = mismatched = 0
        with torch.no_grad():
            for name in names:
                t = src.tensors[name]
                if t.mode == "context":
                    pos, vals = self._decode_context(src, name)
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
                "warm": self.warm,
                "generation": self.generation, "last": self.last}


__all__ = ["DwsWeightTransferEngine", "UnsupportedModelError"]
