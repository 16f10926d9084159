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
hand-over costs more than it saves. At 0.8 M numbers (the GPT CPU recipe,
parameters flattened) the split still paid: a whole training step took 0.5-0.7
ms less with the bound at 2^19 than at 2^20 (alternating blocks in one
process, 2 cores of an Intel Xeon, 2026-12-01). The thread count is
:func:`mnn.blas.threads` (numpy's BLAS threads; one inside a replica).

Arrays that lie end to end in one buffer (a model's parameters and gradients
after :meth:`~mnn.module.Module.flatten_parameters`) are passed over as one:
:func:`runs` merges them, so that a step makes a few calls of a few hundred
thousand numbers instead of one call per array. On the GPT CPU recipe
(52 arrays, 0.81 M float32, one thread, 2026-12-01) the AdamW update took
1.14 ms array by array and 0.46 ms as one call.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy

from mnn import blas
from mnn.backend import on_cpu

MIN_ELEMENTS = 1 << 19
PIECE = 1 << 21  # numbers in one merged run at most: a long run is cut into an even number of equal pieces
NUMPY_PIECE = 1 << 18  # the same for numpy's path of an optimizer: its work buffers, and each piece, stay in cache
_ALIGN = 16  # numbers: a cut falls on a 64-byte boundary of float32
_pool = None
_runs_cache: dict = {}  # ids of the arrays -> (the arrays, their runs): a step passes the same lists every time


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
    cut, running, gap = 1, 0, None
    for index, size in enumerate(sizes[:-1]):  # the first run: the items that come nearest to half of the work
        running += size
        if gap is None or abs(2 * running - total) < gap:
            cut, gap = index + 1, abs(2 * running - total)
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="mnn-passes")
    second = _pool.submit(lambda: [function(item) for item in items[cut:]])
    try:
        first = [function(item) for item in items[:cut]]
    finally:
        rest = second.result()  # waited for even when the first run raised
    return first + rest


def root(array):
    """The ndarray at the bottom of ``array``'s chain of views (the buffer its memory belongs to)."""
    while isinstance(array.base, numpy.ndarray):
        array = array.base
    return array


def _merge(arrays: list):
    """One 1-D view of ``arrays``, which lie end to end in one root buffer."""
    first, buffer = arrays[0], root(arrays[0])
    start, size = first.ctypes.data - buffer.ctypes.data, sum(array.nbytes for array in arrays)
    view = buffer.reshape(-1).view(numpy.uint8)[start: start + size].view(first.dtype)
    if not all(array.flags.writeable for array in arrays):
        view.flags.writeable = False  # no more writable than the arrays it stands for
    return view


def runs(columns: list, piece: int = PIECE) -> list:
    """The rows of ``columns`` (equal-length lists of arrays, e.g. parameters, gradients, moments), with neighbours
    merged where every column's arrays lie end to end in one buffer, and long runs cut into ``piece``-sized parts.

    Each row is a tuple with one array per column; a merged or cut row holds
    1-D views of the same memory, so an element-wise pass over the rows does
    exactly what it does over the arrays, to the bit. The rows come in the
    order the first column's arrays lie in memory, not the columns' order.
    Arrays that are not C-contiguous numpy arrays of one dtype across a row
    are left as they are, at the end (on a GPU nothing is merged). The answer
    is cached for the same arrays (the last 16 lists: a step passes the same
    ones every time, and finding neighbours costs about 4 us an array).
    """
    key = tuple(id(array) for column in columns for array in column)
    cached = _runs_cache.get(key)
    if cached is not None:
        return cached[1]
    rows = list(zip(*columns))
    if rows and all(isinstance(array, numpy.ndarray) for array in rows[0]):
        rows = _merged(rows, piece)
    if len(_runs_cache) >= 16:
        _runs_cache.clear()
    _runs_cache[key] = (columns, rows)  # the arrays are held, so their ids cannot be reused while cached
    return rows


def _part(size: int, piece: int) -> int:
    """The length of each piece of a run of ``size`` numbers: equal pieces of at most ``piece``, an even number of
    them where the run is worth two threads (:data:`MIN_ELEMENTS`: each then takes half), rounded up to
    :data:`_ALIGN` numbers where they are longer."""
    count = -(-size // piece)
    count += count % 2 if size >= MIN_ELEMENTS else 0
    part = -(-size // count)
    return -(-part // _ALIGN) * _ALIGN if part > _ALIGN else part


def _merged(rows: list, piece: int) -> list:
    """``rows`` in the order their first arrays lie in memory, neighbours merged, long runs cut (:func:`runs`)."""
    def flat(row):
        return (all(isinstance(a, numpy.ndarray) and a.flags.c_contiguous for a in row)
                and all(a.dtype == row[0].dtype for a in row))

    plain = [(row, [(root(a), a.ctypes.data) for a in row]) for row in rows if flat(row)]
    plain.sort(key=lambda item: (id(item[1][0][0]), item[1][0][1]))  # each buffer's arrays by address
    groups, previous = [], None
    for row, places in plain:
        follows = previous is not None and all(
            buffer is buffer_before and address == address_before + before.nbytes
            for (buffer, address), (buffer_before, address_before), before in zip(places, previous[1], previous[0]))
        if follows:
            groups[-1].append(row)
        else:
            groups.append([row])
        previous = (row, places)
    merged = []
    for group in groups:
        if len(group) == 1 and group[0][0].size <= piece:
            merged.append(group[0])
            continue
        size = sum(int(row[0].size) for row in group)
        whole = [_merge([row[k] for row in group]) for k in range(len(group[0]))]
        part = _part(size, piece)
        merged.extend(tuple(view[start: start + part] for view in whole) for start in range(0, size, part))
    return merged + [row for row in rows if not flat(row)]
