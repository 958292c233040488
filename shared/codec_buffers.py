"""Large output arrays of the codec's passes, recycled between calls instead of freshly mapped each time.

Why: a publisher diffs and encodes a model every version, and every pass writes its changed elements into arrays
the size of the changes (ctx detection: 17 bytes per changed element -- 400 MB for a 0.6B model at 4 %). Fresh
arrays that large are new pages from the kernel: every 4 KiB faults and is zeroed on first write. Measured on this
2-core VM: the ctx detection's ranking pass took 420-460 thread-ms writing into fresh arrays against 280 into
reused ones, two threads faulting at once being slower than one. Recycled arrays are already resident.

Safety rests on object lifetimes, not on callers: an array is lent as `np.frombuffer` of a pooled buffer, whose
base -- a memoryview numpy makes for it -- every array derived from it keeps alive (numpy views hold their base),
and the pool keeps only a weak reference to that memoryview -- a buffer is lent again once it is dead, i.e. once nothing can reach the
memory. The previous version's changes can be kept as long as anyone likes: they are never overwritten, the pool
just allocates beside them. What is kept is bounded (`Recycler.keep_bytes`); buffers beyond it are dropped,
least recently used first, and small requests are plain `np.empty` (their pages come from malloc's heap anyway).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque

import numpy as np

_MIN_BYTES = 1 << 16  # smaller arrays come from malloc's heap, already resident
_STEPS = 8  # sizes round up to 8 steps per power of two (at most 12.5 % unused), so next version's sizes hit


def _rounded(nbytes: int) -> int:
    shift = max(0, nbytes.bit_length() - 4)
    return -(-nbytes >> shift) << shift  # the top 4 bits kept: within 1/8 above nbytes


class Recycler:
    """A pool of byte buffers, each lent as one array at a time (see the module docstring)."""

    def __init__(self, *, keep_bytes: int = 2 << 30):
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        # Free buffers by size class. A loan's end appends its buffer here from a weakref callback -- whichever
        # thread drops the last array, possibly one inside `empty` itself: deque appends and pops are atomic, so
        # the callback takes no lock (it could otherwise deadlock on the lock its own thread holds).
        self._free: dict[int, deque] = {}
        self._loans: dict[int, weakref.ref] = {}  # buffer id -> the weak reference whose callback returns it
        self._held = 0

    def _lend(self, buf: np.ndarray, n: int, dtype: np.dtype) -> np.ndarray:
        arr = np.frombuffer(memoryview(buf), dtype, count=n)
        # numpy exports the buffer through a memoryview of its own: the base of `arr` and (through `arr`) of every
        # array derived from it. A numpy that kept anything else as base could not be seen to let go: its buffers
        # are simply not returned (never lent twice).
        owner = arr.base
        if isinstance(owner, memoryview) and owner.obj is buf:
            free = self._free[buf.nbytes]
            self._loans[id(buf)] = weakref.ref(owner, lambda _, b=buf, f=free: f.append(b))
        return arr

    def empty(self, n: int, dtype) -> np.ndarray:
        """An uninitialised array of `n` elements of `dtype`, as `np.empty`, from a resident buffer when one is free."""
        dtype = np.dtype(dtype)
        nbytes = n * dtype.itemsize
        if nbytes < _MIN_BYTES:
            return np.empty(n, dtype)
        size = _rounded(nbytes)  # exactly its size class: a much larger buffer would hold its pages idle
        with self._lock:
            free = self._free.setdefault(size, deque())
            try:
                buf = free.pop()
            except IndexError:
                buf = np.empty(size, np.uint8)
                self._held += size
                self._trim()
            return self._lend(buf, n, dtype)

    def empty_many(self, n: int, dtypes) -> list[np.ndarray]:
        """Uninitialised arrays of `n` elements, one per dtype, carved from one loan (each starting on a 64-byte
        line): a caller that needs several arrays of one length pays one loan, not one per array."""
        dtypes = [np.dtype(t) for t in dtypes]
        offsets, end = [], 0
        for t in dtypes:
            offsets.append(end)
            end += -(-n * t.itemsize // 64) * 64
        raw = self.empty(end + 64, np.uint8)
        first = -raw.ctypes.data % 64  # malloc gives 16-byte alignment
        return [raw[first + o: first + o + n * t.itemsize].view(t) for o, t in zip(offsets, dtypes)]

    def _trim(self) -> None:
        """Drop free buffers, largest size class first, while more than `keep_bytes` are held."""
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while self._held > self.keep_bytes:
                try:
                    buf = free.pop()
                except IndexError:
                    break
                self._loans.pop(id(buf), None)
                self._held -= size

    @property
    def held_bytes(self) -> int:
        """Bytes of every buffer the pool made and has not dropped, lent or free."""
        return self._held

    def clear(self) -> None:
        """Forget every buffer (arrays still lent stay valid: they keep their buffer alive)."""
        with self._lock:
            self._free.clear()
            self._loans.clear()
            self._held = 0


RECYCLER = Recycler()
empty = RECYCLER.empty
empty_many = RECYCLER.empty_many
