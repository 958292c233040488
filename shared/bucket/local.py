"""The local-folder backend: the embedded default used by `make demo`, the tests and CI.

Writes go to a temporary file in the destination folder, are fsynced, then renamed over the target: a crash at any
moment leaves either the old file or the new one (docs/design.md §3.4 rule 2 depends on this for manifest.json).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from shared.bucket import Bucket, BucketEntry, register_backend, safe_path
from shared.errors import BucketError, BucketFileNotFound


def _atomic_write(dest: Path, writer) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        # A failed write must not leave temp files that look like data, nor replace the old file.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class LocalBucket(Bucket):
    def __init__(self, root: str | Path, *, create: bool = False):
        self.root = Path(root).expanduser().resolve()
        self.address = str(self.root)
        if not self.root.exists():
            if not create:
                raise BucketFileNotFound(f"local bucket folder {self.root} does not exist")
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise BucketError(f"local bucket address {self.root} is not a folder")

    def _p(self, path: str) -> Path:
        return self.root / safe_path(path)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._p(path).read_bytes()
        except FileNotFoundError:
            raise BucketFileNotFound(f"{path} not found in bucket {self.address}") from None
        except IsADirectoryError:
            raise BucketError(f"{path} is a folder in bucket {self.address}") from None

    def write_bytes(self, path: str, data: bytes) -> None:
        _atomic_write(self._p(path), lambda f: f.write(data))

    def upload(self, local_path: str | Path, path: str) -> None:
        with open(local_path, "rb") as src:
            _atomic_write(self._p(path), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def download(self, path: str, local_path: str | Path) -> None:
        src = self._p(path)
        if not src.is_file():
            raise BucketFileNotFound(f"{path} not found in bucket {self.address}")
        with open(src, "rb") as s:
            _atomic_write(Path(local_path), lambda f: shutil.copyfileobj(s, f, 1 << 20))

    def list(self, prefix: str = "") -> list[BucketEntry]:
        base = self._p(prefix) if prefix else self.root
        if not base.exists():
            return []
        out = []
        for p in base.rglob("*") if base.is_dir() else [base]:
            # Temp files of in-flight writes are not part of the bucket.
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp")):
                st = p.stat()
                out.append(BucketEntry(p.relative_to(self.root).as_posix(), st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        return sorted(out, key=lambda e: e.path)

    def stat(self, path: str) -> BucketEntry | None:
        try:
            st = self._p(path).stat()
        except FileNotFoundError:
            return None
        return BucketEntry(path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            try:
                self._p(path).unlink()
            except FileNotFoundError:
                pass


@register_backend("file")
def _open_local(address: str, *, token: str | None = None, create: bool = False) -> LocalBucket:
    root = address[len("file://"):] if address.startswith("file://") else address
    return LocalBucket(root, create=create)
