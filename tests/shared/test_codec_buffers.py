"""The codec's recycled output buffers (`shared.codec_buffers`): a buffer is lent again only once nothing can reach
its memory -- views, views of views and torch tensors sharing it all hold it -- and what the pool keeps is bounded."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shared.codec_buffers import Recycler

MB = 1 << 20


def test_a_buffer_is_lent_again_only_after_every_array_on_it_is_gone():
    pool = Recycler()
    a = pool.empty(MB, np.int64)
    a[:] = 7
    view = a[5:9].view(np.int32)[::2]  # a view of a view: it too holds the buffer
    del a
    b = pool.empty(MB, np.int64)  # same size class while `view` lives: a different buffer
    b[:] = 1
    assert not np.shares_memory(view, b) and (view == 7).all()
    held = pool.held_bytes
    del view
    c = pool.empty(MB, np.int64)  # now the first buffer is free: no new memory
    assert pool.held_bytes == held and c.flags.writeable and c.size == MB


def test_empty_many_carves_disjoint_aligned_arrays_from_one_loan_held_by_each():
    pool = Recycler()
    kinds = [np.int64, np.uint16, np.uint16, np.int32, np.int16]
    n = MB + 3  # not a multiple of the line: every array still starts on one
    arrays = pool.empty_many(n, kinds)
    assert [a.dtype for a in arrays] == [np.dtype(t) for t in kinds] and all(a.size == n for a in arrays)
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous and a.flags.writeable for a in arrays)
    for i, a in enumerate(arrays):
        a[:] = i + 1
    for i, a in enumerate(arrays):  # no array overlaps another
        assert (a == i + 1).all() and not any(np.shares_memory(a, b) for b in arrays[i + 1:])
    held = pool.held_bytes
    last = arrays[-1]
    del arrays, a
    again = pool.empty_many(n, kinds)  # the one buffer is still held by `last`: a new one
    assert pool.held_bytes > held and (last == len(kinds)).all()
    assert not any(np.shares_memory(last, b) for b in again)
    held = pool.held_bytes
    del last, again
    pool.empty_many(n, kinds)
    assert pool.held_bytes == held  # both loans came back once nothing reached them


def test_a_torch_tensor_on_a_lent_array_keeps_it():
    torch = pytest.importorskip("torch")
    pool = Recycler()
    a = pool.empty(MB, np.int16)
    a[:] = 3
    t = torch.from_numpy(a)
    del a
    b = pool.empty(MB, np.int16)
    b[:] = -1
    assert int(t.min()) == 3 and int(t.max()) == 3
    held = pool.held_bytes
    del t, b
    pool.empty(MB, np.int16)
    pool.empty(MB, np.int16)
    assert pool.held_bytes == held  # both came back


def test_sizes_round_to_classes_and_small_requests_are_plain_arrays():
    pool = Recycler()
    small = pool.empty(100, np.int64)
    assert small.base is None and pool.held_bytes == 0  # below the pool's minimum: np.empty
    a = pool.empty(MB + 1, np.uint8)
    assert a.size == MB + 1 and MB + 1 <= pool.held_bytes <= (MB + 1) * 9 // 8
    del a
    b = pool.empty(MB + 1000, np.uint8)  # the next version's slightly different size: the same size class
    assert pool.held_bytes <= (MB + 1) * 9 // 8 and b.size == MB + 1000


def test_what_the_pool_keeps_is_bounded():
    pool = Recycler(keep_bytes=4 * MB)
    arrays = [pool.empty(MB, np.uint8) for _ in range(8)]  # lent: all held, whatever the bound
    assert pool.held_bytes == 8 * MB
    del arrays
    pool.empty(2 * MB, np.uint8)  # a new size: the free ones beyond the bound are dropped
    assert pool.held_bytes <= 4 * MB + 2 * MB


def test_threads_lending_at_once_never_share_a_buffer():
    pool = Recycler()
    seen, lock, errors = [], threading.Lock(), []

    def work(tag: int) -> None:
        for _ in range(200):
            a = pool.empty(MB // 8, np.int64)
            a[:] = tag
            with lock:
                seen.append(a.__array_interface__["data"][0])
            if not (a == tag).all():
                errors.append(tag)
            del a

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.held_bytes <= 4 * MB * 9 // 8  # at most one buffer per thread at a time, reused
