"""Memory-bound passes over many arrays on every core: optimizer updates, zeroing, norms and sums of gradients.

A training step ends with passes that read and write every parameter-sized
array once or a few times: zeroing the gradients, adding the replicas'
gradients, their norm for clipping, the scaling, the optimizer's update. Each
array's pass is independent of the others', so :func:`for_each` hands the
arrays, cut into two runs of about equal size, to two threads: the numpy
ufuncs and mnn's compiled loops (:mod:`mnn.jit`) release the GIL while they
work. Each array is still computed by one call, as before, so every result
is the same to the bit; sums over arrays (the norm) are added in their order
by the caller. Measured on 2 cores of an Intel Xeon (2026-12-01), over
10.7 M float32 (nanoGPT's GPU config): zeroing 1.61 ms on one thread and
0.89 on two, ``a += b`` 3.17 and 1.63, a sum of squares 1.53 and 0.91.

Only large work is split (``MIN_ELEMENTS`` in all): below it a thread's
hand-over costs more than it saves. The thread count is
:func:`mnn.blas.threads` (numpy's BLAS threads; one inside a replica).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from mnn import blas
from mnn.backend import on_cpu

MIN_ELEMENTS = 1 << 20
_pool = None


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def for_each(function, items: list, sizes: list) -> list:
    """``[function(item) for item in items]``, the items in two runs of about equal total ``sizes`` on two threads
    when the work is large, on a CPU, with two threads or more; the results in the items' order."""
    global _pool
    total = sum(sizes)
    if total < MIN_ELEMENTS or len(items) < 2 or blas.threads() < 2 or not on_cpu():
        return [function(item) for item in items]
    cut, running = len(items) - 1, 0
    for index, size in enumerate(sizes):  # the first run: the items up to half of the work
        running += size
        if 2 * running >= total:
            cut = max(1, min(index + 1, len(items) - 1))
            break
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="mnn-passes")
    second = _pool.submit(lambda: [function(item) for item in items[cut:]])
    try:
        first = [function(item) for item in items[:cut]]
    finally:
        rest = second.result()  # waited for even when the first run raised
    return first + rest
