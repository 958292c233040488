"""The ``dws`` WeightTransferEngine (worker side). Registered lazily by :func:`rollout_space.plugin.register`.

See rollout_space/plugin.py for the protocol; this module is imported only inside vLLM workers that selected
``--weight-transfer-config '{"backend": "dws"}'``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine

from rollout_space.plugin import (
    BACKEND,
    DEFAULT_CHUNK_BYTES,
    DwsInitInfo,
    DwsUpdateInfo,
    InconsistentWeightsError,
    PatchError,
    decode_delta,
    resolve_decoder,
    validate_anchor,
    validate_delta,
)
from rollout_space.weights import CheckpointView

logger = logging.getLogger("dws.engine")


class DwsWeightTransferEngine(WeightTransferEngine[DwsInitInfo, DwsUpdateInfo]):
    """Applies dws deltas / anchors from local files, in place, in checkpoint coordinates."""

    dws_backend = True  # marker read by DwsWorkerExtension (avoids importing this module in every process)

    init_info_cls = DwsInitInfo
    update_info_cls = DwsUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.view = CheckpointView(model)
        self.chunk_bytes = int(os.environ.get("DWS_PATCH_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
        self.version: int | None = None
        self.consistent = True
        self.last: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        model_dir = getattr(self.model_config, "model", None)
        if model_dir and os.path.isdir(model_dir):
            try:
                ignored = self.view.check_against_checkpoint(model_dir)
                if ignored:
                    logger.info("dws: checkpoint tensors vLLM does not load: %s", ignored[:10])
            except FileNotFoundError:
                pass

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def init_transfer_engine(self, init_info: DwsInitInfo) -> None:
        if init_info.digest is not None:
            served = self.view.digest()
            if served != init_info.digest:
                raise InconsistentWeightsError(f"served digest {served} != declared {init_info.digest}")
        self.version = init_info.version
        self.consistent = True

    def start_weight_update(self) -> None:
        """No-op: patches are applied in place (no layerwise reload)."""

    def finish_weight_update(self) -> None:
        """No-op: patches are applied in place (no layerwise reload)."""

    def shutdown(self) -> None:
        pass

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises on a CPU-only build.
        typed = self.parse_update_info(update_info)
        self.receive_weights(typed)
        if torch.accelerator.current_accelerator() is not None:
            torch.accelerator.synchronize()

    # ---- the update ------------------------------------------------------------------------------------------
    def receive_weights(self, info: DwsUpdateInfo) -> None:
        t0 = time.perf_counter()
        if not os.path.isfile(info.path):
            raise PatchError(f"no such file {info.path}")
        if info.kind == "delta":
            if not self.consistent:
                raise PatchError("weights are inconsistent after a failed update; apply an anchor first")
            if info.base is not None and self.version is not None and info.base != self.version:
                raise PatchError(f"delta base {info.base} != served version {self.version}")
            decoded = decode_delta(resolve_decoder(info.decoder), info.path, self.view.shapes(), info.base)
            for attr in ("version", "base"):  # a decoded file that states its own version/base must agree
                stated, asked = getattr(decoded, attr, None), getattr(info, attr)
                if stated is not None and asked is not None and stated != asked:
                    raise PatchError(f"{info.path} is {attr} {stated}, update_info says {asked}")
            patches = validate_delta(self.view, decoded)
            del decoded
            names = [n for n, _, _ in patches]
            n_values = sum(int(p.numel()) for _, p, _ in patches)
        else:
            names = validate_anchor(self.view, info.path, check_values=info.check_values)
            patches = None
            n_values = sum(self.view[n].numel for n in names)
        t1 = time.perf_counter()

        try:  # from here on weights may change
            if info.kind == "delta":
                self._apply_delta(patches, info.apply_mode)
            else:
                self._apply_anchor(info.path, names, info.apply_mode)
        except Exception as exc:
            self.consistent, self.version = False, None
            raise InconsistentWeightsError(f"applying {info.path} failed after writing started: {exc}") from exc
        t2 = time.perf_counter()

        digest = None
        if info.verify:
            digest = self.view.digest()
            if info.expected_digest is not None and digest != info.expected_digest:
                self.consistent, self.version = False, None
                raise InconsistentWeightsError(
                    f"digest after {info.kind} v{info.version}: served {digest} != expected {info.expected_digest}"
                )
        t3 = time.perf_counter()
        self.consistent = True
        self.version = info.version
        self.last = {
            "kind": info.kind,
            "version": info.version,
            "base": info.base,
            "digest": digest,
            "tensors": len(names),
            "values": n_values,
            "apply_mode": info.apply_mode,
            "validate_ms": round((t1 - t0) * 1e3, 3),
            "apply_ms": round((t2 - t1) * 1e3, 3),
            "digest_ms": round((t3 - t2) * 1e3, 3),
        }
        self.history = (self.history + [self.last])[-32:]
        logger.info("dws: applied %s", self.last)

    def _apply_delta(self, patches, mode: str) -> None:
        if mode == "direct":
            with torch.no_grad():
                for name, pos, val in patches:
                    flat = self.view[name].flat()
                    flat.index_copy_(0, pos.to(flat.device), val.to(flat.device))
            return
        from vllm.model_executor.model_loader.checkpoint_weight_patch import (
            CheckpointWeightPatch,
            load_checkpoint_weight_patches,
        )

        device = self.view[patches[0][0]].param.device if patches else None
        load_checkpoint_weight_patches(
            self.model,
            (
                CheckpointWeightPatch(
                    name=name,
                    shape=self.view[name].shape,
                    dtype=torch.bfloat16,
                    values=val.to(device),
                    indices=pos.to(device),
                )
                for name, pos, val in patches
            ),
            max_chunk_bytes=self.chunk_bytes,
            validate_unique_indices=False,  # validate_delta already proved sorted + unique
        )

    def _apply_anchor(self, path: str, names: list[str], mode: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f, torch.no_grad():
            for name in names:  # one dense tensor in memory at a time
                tensor = f.get_tensor(name)
                if mode == "direct":
                    self.view[name].view().copy_(tensor)
                    continue
                from vllm.model_executor.model_loader.checkpoint_weight_patch import (
                    CheckpointWeightPatch,
                    load_checkpoint_weight_patches,
                )

                s = self.view[name]
                load_checkpoint_weight_patches(
                    self.model,
                    [CheckpointWeightPatch(name, s.shape, torch.bfloat16, tensor.reshape(-1).to(s.param.device))],
                    max_chunk_bytes=self.chunk_bytes,
                )

    def status(self) -> dict[str, Any]:
        return {
            "backend": BACKEND,
            "version": self.version,
            "consistent": self.consistent,
            "architecture": self.view.architecture,
            "tensors": len(self.view.names()),
            "last": self.last,
        }
