"""The exception hierarchy of the protocol, in one place so every Space catches the same types.

Callers (CLI, gateway, trainer) turn these into a clear message / HTTP 4xx; they never surface as tracebacks.
"""


class DwsError(Exception):
    """Base class of every error dws raises on purpose."""


class BucketError(DwsError):
    """The bucket could not be read or written (after retries, where the failure looked transient)."""


class BucketFileNotFound(BucketError, FileNotFoundError):
    """A path the caller asked for is not in the bucket."""


class UnsafePathError(DwsError, ValueError):
    """A bucket path that could escape the bucket (absolute, `..`, backslash, empty segment)."""


class FormatError(DwsError, ValueError):
    """A delta, anchor or manifest that does not decode, or decodes to something inconsistent."""


class IntegrityError(DwsError):
    """A downloaded file whose sha256 differs from the manifest, or that is missing."""

    def __init__(self, message: str, *, version: int | None = None):
        super().__init__(message)
        self.version = version


class DigestMismatch(IntegrityError):
    """Weights after applying a version do not hash to the digest the manifest records for it."""


class ChainError(DwsError):
    """No verified path leads from the caller's version to the latest one (gap, missing anchor)."""


class NonFiniteWeightsError(DwsError, ValueError):
    """The trainer tried to publish weights holding NaN or Inf (docs/design.md §3.4 rule 7)."""


class ModelMismatchError(DwsError, ValueError):
    """Tensor names, shapes or dtypes differ from the model identity recorded in the bucket."""


class PublishError(DwsError):
    """A background publish failed; raised to the trainer on its next publish() or flush()."""


class OwnerConflictError(PublishError):
    """The bucket belongs to another publisher (its `owner.json` lease), or this publisher lost it to a take-over.

    Raised instead of writing anything, so that two trainers pointed at one bucket never interleave versions."""
