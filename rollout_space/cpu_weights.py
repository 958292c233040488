"""CPU weight keeping: on vLLM's CPU backend, make linear layers compute from their live parameters.

Why this exists: vLLM's CPU backend packs every linear weight into a oneDNN / sgl-kernel buffer after loading and
then *replaces the parameter with an empty tensor* (``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``);
the tied ``lm_head`` computes from a packed copy too. In-place patches would then either fail or change nothing
that is served. When the dws backend is selected, those layers compute with ``torch.nn.functional.linear`` on the
live parameter instead (slower on big CPU models; on GPU this code path does not exist).
``DWS_CPU_KEEP_WEIGHTS=0`` disables it, ``=force`` applies it to every engine. vLLM's compile-cache key ignores the
weight-transfer config, so dws runs keep their own ``VLLM_CACHE_ROOT``.
"""

from __future__ import annotations

import logging

from shared.envvars import env_str

log = logging.getLogger("dws.cpu_weights")


def _selected() -> bool:
    from shared.envvars import parse_bool

    mode = (env_str("DWS_CPU_KEEP_WEIGHTS", "1") or "1").strip().lower()
    if mode == "force":
        return True
    if not parse_bool(mode, name="DWS_CPU_KEEP_WEIGHTS"):
        return False
    try:
        from vllm.config import get_current_vllm_config

        cfg = get_current_vllm_config().weight_transfer_config
    except Exception:  # noqa: BLE001 -- no current config (a process that builds no model)
        return False
    from rollout_space.plugin import BACKEND

    return cfg is not None and cfg.backend == BACKEND


def install() -> None:
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        import vllm.model_executor.layers.utils as layer_utils
    except Exception:  # pragma: no cover - vLLM layout changed
        log.warning("dws: could not install CPU live-weights dispatch", exc_info=True)
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_dws_wrapped", False):
        return

    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        weight = getattr(layer, "weight", None)
        if weight is None or weight.is_meta or weight.ndim != 2 or not _selected():
            return original(layer, remove_weight)
        import torch

        layer.cpu_linear = torch.nn.functional.linear

    dispatch_cpu_unquantized_gemm._dws_wrapped = True  # type: ignore[attr-defined]
    dispatch_cpu_unquantized_gemm.__wrapped__ = original  # type: ignore[attr-defined]
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
