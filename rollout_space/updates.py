"""The dws backend's typed update descriptions and errors: what crosses vLLM's ``/update_weights`` and the
``dws_apply`` RPC. Plain dataclasses, importable without vLLM (the gateway builds them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("delta", "anchor")


class PatchError(ValueError):
    """The update was rejected before any weight was written."""


class InconsistentWeightsError(RuntimeError):
    """Weights were written but the result is not the expected version (read-back or digest mismatch, or a write
    failed half-way). The replica must not claim any version until an anchor restores a known state."""


@dataclass
class DwsInitInfo:
    """``POST /init_weight_transfer_engine {"init_info": {...}}``: declare the version the engine was started from."""

    version: int | None = None
    digest: str | None = None  # if given, checked against the served weights now


@dataclass
class DwsUpdateInfo:
    """One file to apply: ``POST /update_weights {"update_info": {...}}``, or one step of ``dws_apply``.

    ``path`` is a local, already sha256-verified file: a prepared delta (rollout_space/prepared.py, what the gateway
    sends), any delta ``shared.formats`` reads (dws or TRL layout; decoded here), or an anchor.
    """

    path: str
    kind: str = "delta"
    version: int | None = None  # version the weights are at after this file
    base: int | None = None  # deltas: the version they apply onto
    expected_digest: str | None = None  # checked over every served weight after writing when ``verify``
    verify: bool = True  # full digest inside this call (the /update_weights route); dws_apply verifies after resume
    check_values: bool = True  # anchors: scan every tensor for NaN/Inf before writing (the gateway already did)
    # One part of an anchor stored in parts (shared/parts.py): name -> rows [r0, r1) of the full tensor that this
    # file's tensor holds. None: a whole anchor (every tensor, full shapes).
    rows: dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("update_info.path must be a non-empty string")
        if self.kind not in KINDS:
            raise ValueError(f"update_info.kind must be one of {KINDS}, got {self.kind!r}")
        for f in ("version", "base"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"update_info.{f} must be an integer")
        if self.rows is not None and not (isinstance(self.rows, dict) and all(
                isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r)
                and 0 <= r[0] <= r[1] for r in self.rows.values())):
            raise ValueError("update_info.rows must map tensor names to [r0, r1] row ranges")
        for f in ("verify", "check_values"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"update_info.{f} must be a boolean")

    def to_dict(self) -> dict:
        return asdict(self)


__all__ = ["KINDS", "PatchError", "InconsistentWeightsError", "DwsInitInfo", "DwsUpdateInfo"]
