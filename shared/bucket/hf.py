"""The Hub backend: `hf://buckets/<namespace>/<name>[/<prefix>]` through huggingface_hub's bucket API.

Only these huggingface_hub functions are used (tests intercept exactly them, since the Hub is unreachable here):
`create_bucket`, `batch_bucket_files`, `download_bucket_files`, `list_bucket_tree`, `get_bucket_paths_info`.
Transient failures (connection errors, timeouts, HTTP 429/5xx) are retried with exponential backoff and jitter;
anything else (401/403, a missing bucket) fails at once with a message that names the bucket but never the token.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import httpx
import huggingface_hub as hfh
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from shared.bucket import Bucket, BucketEntry, register_backend, safe_path
from shared.errors import BucketError, BucketFileNotFound

log = logging.getLogger("dws.bucket.hf")
T = TypeVar("T")

RETRY_ATTEMPTS = int(os.environ.get("DWS_BUCKET_RETRIES", "5"))


def _network_errors(module) -> tuple[type[BaseException], ...]:
    return (module.TimeoutException, module.NetworkError, module.RemoteProtocolError)


# huggingface_hub 2.x talks through `httpx2`, a fork whose exceptions share httpx's names but not its classes.
_NETWORK: tuple[type[BaseException], ...] = _network_errors(httpx)
try:
    import httpx2

    _NETWORK += _network_errors(httpx2)
except ImportError:  # an older huggingface_hub on httpx itself
    pass


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server hiccuped; the request itself was fine."""
    if isinstance(exc, (ConnectionError, TimeoutError, *_NETWORK)):
        return True
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return status is None or status == 429 or status >= 500
    # Any other client library's transport errors (requests, urllib3) by name: they subclass none of the above.
    return type(exc).__name__ in {"ConnectError", "ConnectionError", "ReadTimeout", "WriteTimeout", "ConnectTimeout",
                                  "PoolTimeout", "Timeout", "RemoteProtocolError", "ReadError", "WriteError"}


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if isinstance(exc, HfHubHTTPError) and status is not None else type(exc).__name__


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("bucket call failed (%s: %s), attempt %d/%d; retrying in %.1f s", _describe(exc), exc,
                state.attempt_number, RETRY_ATTEMPTS, wait)


def _nap(seconds: float) -> None:
    """The backoff sleep, a module function so that tests can record the waits instead of sleeping them."""
    time.sleep(seconds)


def _retrying(fn: Callable[[], T]) -> tuple[T | None, BaseException | None, int]:
    """Run `fn` with bounded retries of transient failures; returns (result, final error or None, attempts made)."""
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(RETRY_ATTEMPTS),
        wait=wait_exponential_jitter(initial=0.5, max=10),
        before_sleep=_log_retry,
        sleep=_nap,
        reraise=True,
    )
    try:
        return retrying(fn), None, retrying.statistics.get("attempt_number", 1)
    except Exception as exc:  # noqa: BLE001 -- classified by the caller
        return None, exc, retrying.statistics.get("attempt_number", 1)


class HfBucket(Bucket):
    def __init__(self, address: str, *, token: str | None = None, create: bool = False):
        rest = address[len("hf://"):]
        parts = rest.split("/")
        if len(parts) < 3 or parts[0] != "buckets" or not parts[1] or not parts[2]:
            raise BucketError(f"Hub bucket address must look like hf://buckets/<namespace>/<name>[/prefix], got {address!r}")
        self.address = address.rstrip("/")
        self.bucket_id = f"{parts[1]}/{parts[2]}"
        self.prefix = "/".join(p for p in parts[3:] if p)
        if self.prefix:
            safe_path(self.prefix)
        self._token = token or os.environ.get("HF_TOKEN") or None
        if create:
            self._call(lambda: hfh.create_bucket(self.bucket_id, exist_ok=True, private=True, token=self._token))

    def _remote(self, path: str) -> str:
        safe_path(path)
        return f"{self.prefix}/{path}" if self.prefix else path

    def _call(self, fn: Callable[[], T], *, path: str | None = None) -> T:
        result, exc, attempts = _retrying(fn)
        if exc is None:
            return result
        what = path or "request"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        if isinstance(exc, (EntryNotFoundError, RemoteEntryNotFoundError)):
            raise BucketFileNotFound(f"{path} not found in bucket {self.address}") from None
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", None)
            hint = {401: "check HF_TOKEN", 403: "the token lacks write/read access to this bucket",
                    404: "the bucket does not exist (the trainer creates it on first publish)"}.get(status, "")
            failures = getattr(exc, "failures", None)  # BucketBatchError: which operations the server refused
            detail = f"; server: {failures[0]}" if failures else ""
            raise BucketError(f"bucket {self.address}: HTTP {status} on {what}{tries}"
                              + (f" ({hint})" if hint else "") + detail) from None
        if is_transient(exc) or isinstance(exc, OSError):
            # The token never appears here: exception texts of the transport name hosts and paths only.
            log.error("bucket %s: giving up on %s%s: %s: %s", self.address, what, tries, type(exc).__name__, exc)
            raise BucketError(f"bucket {self.address}: {type(exc).__name__} on {what}{tries}: {exc}") from None
        raise exc

    def read_bytes(self, path: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="dws-hf-") as tmp:
            dest = Path(tmp) / "file"
            self.download(path, dest)
            return dest.read_bytes()

    def write_bytes(self, path: str, data: bytes) -> None:
        remote = self._remote(path)
        self._call(lambda: hfh.batch_bucket_files(self.bucket_id, add=[(data, remote)], token=self._token), path=path)

    def upload(self, local_path: str | Path, path: str) -> None:
        remote = self._remote(path)
        self._call(lambda: hfh.batch_bucket_files(self.bucket_id, add=[(str(local_path), remote)], token=self._token),
                   path=path)

    def download(self, path: str, local_path: str | Path) -> None:
        remote = self._remote(path)
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # The xet client writes the destination in place; a temp name + rename keeps a torn download invisible.
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        try:
            self._call(lambda: hfh.download_bucket_files(self.bucket_id, files=[(remote, tmp)],
                                                         raise_on_missing_files=True, token=self._token), path=path)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def list(self, prefix: str = "") -> list[BucketEntry]:
        remote = self._remote(prefix) if prefix else (self.prefix or None)

        def run() -> list:
            return list(hfh.list_bucket_tree(self.bucket_id, prefix=remote, recursive=True, token=self._token))

        strip = len(self.prefix) + 1 if self.prefix else 0
        entries = [BucketEntry(f.path[strip:], int(f.size), getattr(f, "xet_hash", None))
                   for f in self._call(run, path=prefix or "/") if getattr(f, "type", "file") == "file"]
        return sorted(entries, key=lambda e: e.path)

    def stat(self, path: str) -> BucketEntry | None:
        remote = self._remote(path)
        try:
            infos = self._call(lambda: list(hfh.get_bucket_paths_info(self.bucket_id, [remote], token=self._token)),
                               path=path)
        except BucketFileNotFound:
            return None
        for f in infos:
            if f.path == remote:
                return BucketEntry(path, int(f.size), getattr(f, "xet_hash", None))
        return None

    def delete(self, paths: Iterable[str]) -> None:
        remote = [self._remote(p) for p in paths]
        if remote:
            self._call(lambda: hfh.batch_bucket_files(self.bucket_id, delete=remote, token=self._token))


@register_backend("hf")
def _open_hf(address: str, *, token: str | None = None, create: bool = False) -> HfBucket:
    return HfBucket(address, token=token, create=create)
