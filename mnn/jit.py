r"""Optional compiled loops (numba) for element-wise updates that numpy would run as many passes.

A numpy expression such as the Adam update runs one pass over memory per
operation: about fifteen passes over every parameter for one step. The same
equations written as a loop over the elements and compiled by numba read and
write each element once. The loop is the same arithmetic, one element at a
time, and cites the same equations as the numpy code beside it.

Only arithmetic, square roots and one logarithm per row go into the loops:
numba's ``tanh`` and ``exp`` are not vectorised (without Intel's SVML) and
run slower than numpy's (30 and 6 ns an element against about 0.5 ns), so GELU
leaves its ``tanh``, and the cross-entropy its ``exp``, to numpy between two
compiled passes. (A single-pass GELU with its own vectorised exponential was
tried: the arithmetic made it compute-bound, 1.25 ms on ``(1536, 512)``
against 1.3 ms for the three passes, so it was dropped.)

This is an optional extra (``pip install 'manual-nn[fast]'``): without numba,
or on a GPU, or with ``MNN_JIT=0`` in the environment, every caller takes its
pure-numpy path, which stays the reference (the tests compare the two).
Kernels are compiled on their first call (about a second each) and cached on
disk beside this file; they release the GIL.
"""

from __future__ import annotations

import functools
import os

import numpy

from mnn.backend import xp

_enabled = os.environ.get("MNN_JIT", "1") != "0"
_numba = None  # the numba module once imported (on first use: it takes half a second), False if absent


def _load_numba():
    global _numba
    if _numba is None:
        try:  # optional: mnn runs on numpy alone
            import numba  # noqa: PLC0415
        except ImportError:
            _numba = False
        else:
            _numba = numba
    return _numba


def enabled() -> bool:
    """Whether compiled kernels are used: ``MNN_JIT`` is not ``0``, arrays are numpy's, numba is installed."""
    return _enabled and xp._module is numpy and bool(_load_numba())


def set_enabled(flag: bool) -> bool:
    """Turn the compiled kernels on or off (tests run both paths); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def usable(*arrays) -> bool:
    """Whether the compiled kernels can take these arrays: :func:`enabled`, and every array C-contiguous."""
    return enabled() and all(array.flags.c_contiguous for array in arrays)


def kernel(function=None, *, reassociate: bool = False):
    """Compile ``function`` with numba on its first call (no Python objects, GIL released, cached on disk).

    ``error_model="numpy"``: a division by zero gives ``inf``/``nan`` as in
    numpy instead of raising, which also lets the loops be vectorised.
    ``reassociate=True`` lets a sum over a row be added in any order (SIMD
    partial sums, as numpy's own reductions do); nothing else of fast-math.
    Callers check :func:`enabled` first: without numba nothing is compiled,
    and the loop is never run element by element in Python.
    """
    if function is None:
        return lambda f: kernel(f, reassociate=reassociate)
    compiled = None

    @functools.wraps(function)
    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = _load_numba().njit(cache=True, nogil=True, error_model="numpy",
                                          fastmath={"reassoc"} if reassociate else False)(function)
        return compiled(*args)

    return run


def flat(array):
    """``array`` as a 1-D view (no copy): the kernels loop over elements; refuses a non-contiguous array."""
    if not array.flags.c_contiguous:
        raise ValueError(f"compiled kernels need contiguous arrays, got strides {array.strides}")
    return array.reshape(-1)
