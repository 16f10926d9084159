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
disk by numba (in ``__pycache__`` beside the source, else in the user's cache
folder, or in ``NUMBA_CACHE_DIR`` when set); they release the GIL. The compiled
path never makes mnn fail: where numba finds no folder it can write (mnn
installed by another user, no writable home) or cannot write its cache (a full
disk), the kernels are compiled without a cache, with one warning per process;
arrays of a dtype the kernels are not written for (float16, complex) take the
numpy path.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy

from mnn.backend import xp

_enabled = os.environ.get("MNN_JIT", "1") != "0"
_numba = None  # the numba module once imported (on first use: it takes half a second), False if absent
_cache_warned = False  # whether the warning that kernels are compiled without a cache was shown
# dtype.char of what the kernels take: float32, float64, the integers and bool (not float16, complex, longdouble)
_KERNEL_DTYPES = frozenset("fd?bBhHiIlLqQ")


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
    """Whether the compiled kernels can take these arrays: :func:`enabled`, every array C-contiguous and of
    a dtype the kernels are compiled for (float32, float64, integers, bool)."""
    return enabled() and all(array.flags.c_contiguous and array.dtype.char in _KERNEL_DTYPES for array in arrays)


def usable_any_layout(*arrays) -> bool:
    """As :func:`usable`, for element-wise kernels: every array dense in the same axis order, not only C order.

    A channels-last ``(N, C, H, W)`` view (:class:`~mnn.layers.Conv2d`'s
    output) is dense but not C-contiguous; an element-wise loop does not care
    about the axis order as long as every operand enumerates its elements in
    the same one, which :func:`flat` then does. Outputs are allocated with
    ``empty_like`` (which keeps a dense input's memory layout).
    """
    if not (enabled() and arrays and all(array.dtype.char in _KERNEL_DTYPES for array in arrays)):
        return False
    order = memory_order(arrays[0])
    return all(array.shape == arrays[0].shape and array.transpose(order).flags.c_contiguous for array in arrays)


def memory_order(array) -> tuple:
    """The axes from the largest stride to the smallest: ``array.transpose(order)`` is C-contiguous when
    ``array`` is dense in some axis order (a channels-last ``(N, C, H, W)`` view gives ``(0, 2, 3, 1)``)."""
    return tuple(sorted(range(array.ndim), key=lambda axis: -abs(array.strides[axis])))


def kernel(function=None, *, reassociate: bool = False, fused_multiply_add: bool = False):
    """Compile ``function`` with numba on its first call (no Python objects, GIL released, cached on disk).

    ``error_model="numpy"``: a division by zero gives ``inf``/``nan`` as in
    numpy instead of raising, which also lets the loops be vectorised.
    ``reassociate=True`` lets a sum over a row be added in any order (SIMD
    partial sums, as numpy's own reductions do); ``fused_multiply_add=True``
    lets ``a * b + c`` be one instruction rounded once (polynomials); nothing
    else of fast-math.
    Callers check :func:`enabled` first: without numba nothing is compiled,
    and the loop is never run element by element in Python. Where numba
    cannot cache (no writable folder; a cache file it cannot read or write),
    the kernel is compiled without a cache and :func:`_warn_uncached` says so once.
    """
    if function is None:
        return lambda f: kernel(f, reassociate=reassociate, fused_multiply_add=fused_multiply_add)
    flags = {"reassoc"} if reassociate else set()
    flags |= {"contract"} if fused_multiply_add else set()
    options = {"nogil": True, "error_model": "numpy", "fastmath": flags or False}
    compiled = None

    @functools.wraps(function)
    def run(*args):
        nonlocal compiled
        if compiled is None:
            try:
                compiled = _load_numba().njit(cache=True, **options)(function)
            except (RuntimeError, OSError) as error:  # "cannot cache function ...: no locator available"
                _warn_uncached(error)
                compiled = _load_numba().njit(cache=False, **options)(function)
        try:
            return compiled(*args)
        except OSError as error:  # compiled, but its cache could not be read or written: nothing ran yet
            _warn_uncached(error)
            compiled = _load_numba().njit(cache=False, **options)(function)
            return compiled(*args)

    return run


def _warn_uncached(error: Exception) -> None:
    """Say once per process that kernels are compiled without numba's disk cache, why, and how to get it back."""
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        warnings.warn(f"mnn: numba cannot cache the compiled kernels ({error}); they are compiled in every process "
                      "instead (about a second each). Set NUMBA_CACHE_DIR to a folder you can write to keep them.",
                      RuntimeWarning, stacklevel=3)


def flat(array):
    """``array`` as a 1-D view (no copy) in memory order: the kernels loop over elements; refuses a non-dense array.

    A C-contiguous array is flattened in C order; a dense array in another
    axis order (see :func:`usable_any_layout`) in its memory order.
    """
    if not array.flags.c_contiguous:
        array = array.transpose(memory_order(array))
        if not array.flags.c_contiguous:
            raise ValueError(f"compiled kernels need dense arrays, got strides {array.strides}")
    return array.reshape(-1)
