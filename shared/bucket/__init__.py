"""Bucket access: one small interface, backends chosen by address (docs/design.md §3.1).

    open_bucket("hf://buckets/<ns>/<name>[/prefix]")   -> HfBucket   (huggingface_hub bucket API)
    open_bucket("/some/folder") or "file:///some/folder" -> LocalBucket (the embedded default)

Both behave the same to callers: whole-file writes are atomic (a reader sees the old file or the new one, never a
torn one), paths are POSIX-relative and validated so nothing can escape the bucket, transient failures are retried
with backoff and permanent ones raise `BucketError` with a clear message.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import BucketError, BucketFileNotFound, UnsafePathError

log = logging.getLogger("dws.bucket")

__all__ = [
    "Bucket",
    "BucketEntry",
    "BucketError",
    "BucketFileNotFound",
    "open_bucket",
    "register_backend",
    "safe_path",
]


def safe_path(path: str) -> str:
    """Validate a bucket-relative path; the manifest is untrusted input, so a hostile one must not escape."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"bucket path must be a non-empty string, got {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path or ":" in path.split("/", 1)[0]:
        raise UnsafePathError(f"bucket path must be relative POSIX without drive or scheme: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"bucket path must not contain empty, '.' or '..' segments: {path!r}")
    return path


@dataclass(frozen=True)
class BucketEntry:
    """One stored file. `etag` changes whenever the content may have changed (cheap manifest polling)."""

    path: str
    size: int
    etag: str | None = None


class Bucket(abc.ABC):
    """Whole-file object storage. Paths are relative to the bucket (and its prefix, for hf://)."""

    address: str

    @abc.abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """Raises BucketFileNotFound when absent."""

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes) -> None:
        """Store atomically: readers never observe a partial file."""

    @abc.abstractmethod
    def upload(self, local_path: str | Path, path: str) -> None:
        """Store a local file atomically under `path`."""

    @abc.abstractmethod
    def download(self, path: str, local_path: str | Path) -> None:
        """Fetch `path` into `local_path` (written atomically). Raises BucketFileNotFound when absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[BucketEntry]:
        """Every file under `prefix` (recursive), sorted by path."""

    @abc.abstractmethod
    def stat(self, path: str) -> BucketEntry | None:
        """Size and etag of one file, or None when absent."""

    @abc.abstractmethod
    def delete(self, paths: Iterable[str]) -> None:
        """Remove files; absent ones are ignored (deletion is garbage collection, never correctness)."""

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"


_BACKENDS: dict[str, Callable[..., Bucket]] = {}


def register_backend(scheme: str) -> Callable[[Callable[..., Bucket]], Callable[..., Bucket]]:
    """Register a backend factory for addresses `scheme://…`. Factories take (address, **options)."""

    def deco(factory: Callable[..., Bucket]) -> Callable[..., Bucket]:
        _BACKENDS[scheme] = factory
        return factory

    return deco


def open_bucket(address: str | Path, *, token: str | None = None, create: bool = False) -> Bucket:
    """Open a bucket by address. `create=True` creates it when missing (the publisher does; followers don't)."""
    address = str(address)
    if not address:
        raise BucketError("empty bucket address")
    scheme = address.split("://", 1)[0] if "://" in address else "file"
    # Import the built-in backends lazily so the env Space, which never touches buckets, pays nothing.
    from shared.bucket import hf, local  # noqa: F401

    factory = _BACKENDS.get(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_BACKENDS))
        raise BucketError(f"unknown bucket address scheme {scheme!r} in {address!r} (known: {known}, or a plain path)")
    return factory(address, token=token, create=create)
