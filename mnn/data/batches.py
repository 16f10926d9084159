"""Mini-batches over the first axis of (x, y): one shuffled epoch per call, seeded."""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy

from mnn.backend import xp
from mnn.errors import DataError


def minibatches(x, y, batch_size: int, rng=None, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[tuple]:
    """Iterate once over ``(x, y)`` in mini-batches of ``batch_size`` rows.

    One permutation is drawn per call (per epoch) and each batch is taken with
    one fancy index, so every example appears exactly once per epoch. Without
    ``shuffle`` the batches are contiguous slices (views, no copy) in order.

    Args:
        x: inputs ``(N, ...)``.
        y: targets ``(N, ...)``.
        batch_size: rows per batch; the last batch holds the ``N % batch_size``
            remaining rows unless ``drop_last``.
        rng: a ``numpy.random.Generator`` (advanced by one permutation), a seed,
            or None for a fresh generator. Same seed, same batches.
        shuffle: draw a random order (default) or keep the stored order.
        drop_last: skip the final, shorter batch.

    Yields:
        ``(x_batch, y_batch)`` of ``B`` rows each.

    Raises:
        DataError (at the call, not at the first ``next``): ``x`` and ``y``
            differ in length, the dataset is empty, ``batch_size < 1``, or
            ``batch_size`` exceeds ``N`` (the message gives both numbers: a
            single short batch or, with ``drop_last``, no batch at all would
            almost certainly be a mistake).
    """
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} examples but y has {len(y)}")
    n = len(x)
    if n == 0:
        raise DataError("cannot make mini-batches of an empty dataset")
    integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not integral or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} examples)")
    order = numpy.random.default_rng(rng).permutation(n) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    return _batches(x, y, int(batch_size), order, stop)


def _batches(x, y, batch_size, order, stop):
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            if not isinstance(x, numpy.ndarray):  # a dataset on the GPU: the (host-drawn) rows go there too
                index = xp.asarray(index)
            yield x[index], y[index]
