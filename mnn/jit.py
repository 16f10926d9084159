r"""Optional compiled loops (numba) for element-wise updates that numpy would run as many passes.

A numpy expression such as the Adam update runs one pass over memory per
operation: about fifteen passes over every parameter for one step. The same
equations written as a loop over the elements and compiled by numba read and
write each element once. The loop is the same arithmetic, one element at a
time, and cites the same equations as the numpy code beside it.

Only loops of additions and multiplications are compiled: numba's scalar
``tanh`` and ``exp`` are not vectorised and are slower than numpy's, so a
kernel that needs one leaves it to numpy between two compiled passes.

This is an optional extra (``pip install 'manual-nn[fast]'``): without numba,
or on a GPU, or with ``MNN_JIT=0`` in the environment, every caller takes its
pure-numpy path, which stays the reference (the tests compare the two).
Kernels are compiled on their first call (about a second each) and cached on
disk beside this file; they release the GIL.
"""

from __future__ import annotations

import os

import numpy

from mnn.backend import xp

try:  # optional: mnn runs on numpy alone
    import numba
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

_enabled = os.environ.get("MNN_JIT", "1") != "0"


def enabled() -> bool:
    """Whether compiled kernels are used: numba is installed, arrays are numpy's, ``MNN_JIT`` is not ``0``."""
    return _enabled and numba is not None and xp._module is numpy


def set_enabled(flag: bool) -> bool:
    """Turn the compiled kernels on or off (tests run both paths); returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def usable(*arrays) -> bool:
    """Whether the compiled kernels can take these arrays: :func:`enabled`, and every array C-contiguous."""
    return enabled() and all(array.flags.c_contiguous for array in arrays)


def kernel(function=None, *, reassociate: bool = False):
    """Compile ``function`` with numba on first call (no Python objects, GIL released, cached on disk).

    ``error_model="numpy"``: a division by zero gives ``inf``/``nan`` as in
    numpy instead of raising, which also lets the loops be vectorised.
    ``reassociate=True`` lets a sum over a row be added in any order (SIMD
    partial sums, as numpy's own reductions do); nothing else of fast-math.
    Without numba the function is returned as it is; :func:`enabled` keeps
    callers from running it element by element in Python.
    """
    if function is None:
        return lambda f: kernel(f, reassociate=reassociate)
    if numba is None:
        return function
    return numba.njit(cache=True, nogil=True, error_model="numpy",
                      fastmath={"reassoc"} if reassociate else False)(function)


def flat(array):
    """``array`` as a 1-D view (no copy): the kernels loop over elements; refuses a non-contiguous array."""
    if not array.flags.c_contiguous:
        raise ValueError(f"compiled kernels need contiguous arrays, got strides {array.strides}")
    return array.reshape(-1)
