"""`manifest.json`, the bucket's commit point (docs/design.md §3).

Readers act only on what the manifest lists; every file it names was fully stored before it was written, so a crash
at any moment leaves a consistent bucket. The manifest is untrusted input for replicas: it is parsed with strict
pydantic models and every path is checked so that it cannot point outside `anchors/` or `deltas/`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.bucket import Bucket, safe_path
from shared.errors import BucketFileNotFound, FormatError

MANIFEST_PATH = "manifest.json"
MANIFEST_FORMAT = "dws-manifest"
MAX_MANIFEST_BYTES = 32 << 20


def anchor_path(version: int) -> str:
    return f"anchors/v{version:08d}.safetensors"


def delta_path(version: int) -> str:
    return f"deltas/v{version:08d}.safetensors"


def part_path(version: int, index: int, count: int, *, anchor: bool) -> str:
    """The one path part `index` of `count` of a version may have."""
    return f"{'anchors' if anchor else 'deltas'}/v{version:08d}.part{index:05d}-of-{count:05d}.safetensors"


LAYOUT_DIM0_CHUNKS = "dim0-chunks"


def chunk_rows(rows: int, index: int, count: int) -> tuple[int, int]:
    """Rows [start, stop) that part `index` of `count` holds of a tensor with `rows` rows ("dim0-chunks", the same
    split as torch.chunk and FSDP2's Shard(0): trailing parts may be empty)."""
    if not 0 <= index < count:
        raise ValueError(f"part {index} of {count} does not exist")
    size = -(-rows // count) if rows else 0
    start = min(index * size, rows)
    return start, min(start + size, rows)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    shape: tuple[int, ...]
    dtype: Literal["bfloat16"] = "bfloat16"

    @field_validator("shape")
    @classmethod
    def _nonneg(cls, v):
        if any(d < 0 for d in v):
            raise ValueError("dimensions must be >= 0")
        return v


class ModelIdentity(_Strict):
    """What the weights are: tensor names, shapes and dtypes (checkpoint coordinates), plus a display name."""

    name: str = ""
    tensors: dict[str, TensorSpec]

    @property
    def fingerprint(self) -> str:
        spec = json.dumps({k: [list(v.shape), v.dtype] for k, v in sorted(self.tensors.items())}, separators=(",", ":"))
        return hashlib.sha256(spec.encode()).hexdigest()[:16]

    @property
    def numel(self) -> int:
        total = 0
        for spec in self.tensors.values():
            n = 1
            for d in spec.shape:
                n *= d
            total += n
        return total

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _check_file_path(v: str) -> str:
    safe_path(v)
    if not (v.startswith("anchors/") or v.startswith("deltas/")) or v.count("/") != 1:
        raise ValueError("file paths must be directly under anchors/ or deltas/")
    return v


DIGEST_PATTERN = r"^(xxh3_128:[0-9a-f]{32}|xsum64:[0-9a-f]{16})$"


class PartEntry(_Strict):
    """One part file of a version: part `index` of the entry's parts, holding the rows `layout` assigns it."""

    index: int = Field(ge=0)
    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    changed: int | None = Field(default=None, ge=0)

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str) -> str:
        return _check_file_path(v)


class FileEntry(_Strict):
    """One stored anchor or delta; `digest` is the weights digest of the model *after* this version.

    A single file has `path` and `sha256`; a version in parts has neither, but `parts` (all of them, in index
    order) and `layout`; `bytes` and `changed` are then the totals over its parts."""

    version: int = Field(ge=0)
    path: str | None = None
    bytes: int = Field(ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    digest: str = Field(pattern=DIGEST_PATTERN)
    base: int | None = None
    changed: int | None = Field(default=None, ge=0)
    encoding: str | None = None
    layout: Literal["dim0-chunks"] | None = None
    parts: tuple[PartEntry, ...] = ()

    @field_validator("path")
    @classmethod
    def _safe(cls, v: str | None) -> str | None:
        return v if v is None else _check_file_path(v)

    @model_validator(mode="after")
    def _one_file_or_parts(self):
        if not self.parts:
            if self.path is None or self.sha256 is None or self.layout is not None:
                raise ValueError(f"v{self.version}: a single-file entry needs path and sha256 and has no layout")
            return self
        if self.path is not None or self.sha256 is not None or self.layout is None:
            raise ValueError(f"v{self.version}: an entry in parts has a layout and no path/sha256 of its own")
        n = len(self.parts)
        for k, p in enumerate(self.parts):
            if p.index != k:
                raise ValueError(f"v{self.version}: parts must be listed once each, in order 0..{n - 1}; "
                                 f"position {k} holds part {p.index}")
            want = part_path(self.version, k, n, anchor=self.base is None)
            if p.path != want:
                raise ValueError(f"v{self.version}: part {k} of {n} must be stored at {want}, not {p.path}")
        if self.bytes != sum(p.bytes for p in self.parts):
            raise ValueError(f"v{self.version}: bytes {self.bytes} is not the sum of its parts' sizes")
        if self.changed is not None and all(p.changed is not None for p in self.parts) \
                and self.changed != sum(p.changed for p in self.parts):
            raise ValueError(f"v{self.version}: changed {self.changed} is not the sum of its parts'")
        return self

    @property
    def files(self) -> tuple[tuple[str, int, str], ...]:
        """(path, bytes, sha256) of every stored file of this entry: itself, or each part in order."""
        if self.parts:
            return tuple((p.path, p.bytes, p.sha256) for p in self.parts)
        return ((self.path, self.bytes, self.sha256),)

    def describe_path(self) -> str:
        return self.path if not self.parts else f"{self.parts[0].path} (+{len(self.parts) - 1} more part(s))"


class Manifest(_Strict):
    format: Literal["dws-manifest"] = MANIFEST_FORMAT
    format_version: Literal[1] = 1
    digest: Literal["xxh3_128", "xsum64"] = "xxh3_128"  # algorithm of new versions; absent in old manifests
    model: ModelIdentity
    latest: int = Field(ge=0)
    latest_digest: str
    anchors: tuple[FileEntry, ...] = ()
    deltas: tuple[FileEntry, ...] = ()
    owner: str | None = None  # the publisher that writes here (hostname/pid/run id), for humans and the lock
    updated_at: float = Field(default_factory=time.time)

    @model_validator(mode="before")
    @classmethod
    def _digest_algorithm(cls, data):
        # Absent (every manifest written before the field, and manifests built without it): the algorithm the
        # latest digest names -- "xxh3_128" for every old manifest, the only algorithm there was.
        if isinstance(data, dict) and "digest" not in data:
            algo = str(data.get("latest_digest", "")).partition(":")[0]
            data = {**data, "digest": algo if algo in ("xxh3_128", "xsum64") else "xxh3_128"}
        return data

    @model_validator(mode="after")
    def _consistent(self):
        for kind, entries in (("anchor", self.anchors), ("delta", self.deltas)):
            versions = [e.version for e in entries]
            if versions != sorted(set(versions)):
                raise ValueError(f"{kind} versions must be unique and increasing")
            for e in entries:
                if e.version > self.latest:
                    raise ValueError(f"{kind} v{e.version} is newer than latest v{self.latest}")
        for d in self.deltas:
            if d.base is None or d.base >= d.version:
                raise ValueError(f"delta v{d.version} must name an older base")
        for a in self.anchors:
            if a.base is not None:
                raise ValueError(f"anchor v{a.version} must not have a base")
        entry = self.entry(self.latest)
        if entry is None:
            raise ValueError(f"latest v{self.latest} is not listed")
        if entry.digest != self.latest_digest:
            raise ValueError("latest_digest differs from the latest entry's digest")
        if not self.latest_digest.startswith(self.digest + ":"):
            raise ValueError(f"latest_digest is not a {self.digest} digest, the algorithm this manifest names")
        seen: set[str] = set()
        for e in (*self.anchors, *self.deltas):
            for path, _, _ in e.files:
                if path in seen:
                    raise ValueError(f"file {path} is listed twice")
                seen.add(path)
        return self

    def entry(self, version: int) -> FileEntry | None:
        for e in (*self.deltas, *self.anchors):
            if e.version == version:
                return e
        return None

    def anchor(self, version: int) -> FileEntry | None:
        return next((a for a in self.anchors if a.version == version), None)

    def delta(self, version: int) -> FileEntry | None:
        return next((d for d in self.deltas if d.version == version), None)

    def digest_of(self, version: int) -> str | None:
        e = self.entry(version)
        return e.digest if e else None

    @property
    def paths(self) -> set[str]:
        """Every stored file the manifest names (each part of a version in parts)."""
        return {path for e in (*self.anchors, *self.deltas) for path, _, _ in e.files}

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = MANIFEST_PATH) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise FormatError(f"{source}: {len(data)} bytes is larger than any sane manifest")
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise FormatError(f"{source} is invalid: {where}: {first.get('msg')} ({exc.error_count()} error(s))") from None


def read_manifest(bucket: Bucket) -> Manifest | None:
    """The bucket's manifest, or None for an empty bucket."""
    try:
        data = bucket.read_bytes(MANIFEST_PATH)
    except BucketFileNotFound:
        return None
    return Manifest.from_bytes(data, source=f"{bucket.address}/{MANIFEST_PATH}")


def write_manifest(bucket: Bucket, manifest: Manifest) -> None:
    """The commit: call only after every file the manifest names is fully stored."""
    bucket.write_bytes(MANIFEST_PATH, manifest.to_bytes())
