r"""The array library every layer computes with: numpy on the CPU, CuPy on a GPU.

Layer code imports ``xp`` from here and never ``numpy`` directly, so the same
source runs on both devices::

    from mnn.backend import xp
    y = xp.maximum(x, 0)

``xp`` forwards attribute look-ups to the active module, so switching device
with :func:`use` takes effect everywhere at once. The device is chosen by
``use("cpu" | "gpu" | "strict")``, the CLI's ``--device`` flag, or the
``MNN_DEVICE`` environment variable read at import. CuPy is imported only
when asked for. ``"strict"`` is a stand-in for the GPU on the CPU
(:mod:`mnn.strict`): numpy arithmetic behind arrays that refuse implicit
host conversions as CuPy's do, so the tests catch them without a GPU.

The default floating dtype is float32 (what training uses); gradient checks
switch to float64 with :func:`set_default_dtype` or by passing float64 arrays.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

import numpy


class _ArrayModule:
    """A stand-in for ``numpy``/``cupy`` that forwards to whichever is active."""

    def __init__(self) -> None:
        self._module = numpy

    def __getattr__(self, name: str):
        if _environment_problem is not None:  # MNN_DEVICE named no usable device, and use() was not called
            from mnn.errors import MnnError  # noqa: PLC0415

            raise MnnError(_environment_problem)
        return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"<mnn array module: {self._module.__name__}>"


xp = _ArrayModule()
_default_dtype = numpy.float32
device = "cpu"
_environment_problem: str | None = None  # why MNN_DEVICE could not be used (raised on the first use of xp)
_deferred = threading.local()  # per thread: [(failed, explain), ...] waiting for the next read-back


def use(name: str) -> None:
    """Select the device: ``"cpu"`` (numpy), ``"gpu"`` (CuPy) or ``"strict"`` (the GPU stand-in, :mod:`mnn.strict`).

    Raises:
        ValueError: for any other name.
        RuntimeError: when ``"gpu"`` is asked for and CuPy cannot be imported.

    Checks deferred on the previous device (:func:`defer_check`) are dropped:
    nothing computed from their inputs was read back, or they would have run.
    """
    _deferred.checks = []
    global device, _environment_problem
    if name == "cpu":
        xp._module = numpy
    elif name == "gpu":
        try:
            import cupy  # noqa: PLC0415 - optional, imported only on request
        except ImportError as error:
            raise RuntimeError("CuPy is not installed: pip install 'manual-nn[gpu]' (device 'gpu' computes "
                               "with CuPy)") from error
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - CUDA's own errors: no driver, no device
            raise RuntimeError(f"CuPy is installed but finds no usable GPU ({error})") from error
        if count < 1:
            raise RuntimeError("CuPy is installed but finds no GPU")
        xp._module = cupy
    elif name == "strict":
        from mnn import strict  # noqa: PLC0415

        xp._module = strict.module
    else:
        raise ValueError(f"unknown device {name!r}: expected 'cpu', 'gpu' or 'strict'")
    device, _environment_problem = name, None


def _use_environment() -> None:
    """Select the device ``MNN_DEVICE`` names; a bad value is kept as the error the first use of ``xp`` raises.

    Raising here would make ``import mnn`` itself fail with a traceback from
    deep inside the import (and the ``mnn`` command could not say it in one
    line); :func:`use` afterwards replaces the choice and clears the error.
    """
    global _environment_problem
    name = os.environ.get("MNN_DEVICE", "")
    if not name:
        return
    try:
        use(name)
    except ValueError:
        _environment_problem = f"MNN_DEVICE={name!r} is not a device: expected 'cpu' or 'gpu' (or 'strict', the GPU stand-in; or unset it)"
    except RuntimeError as error:
        _environment_problem = f"MNN_DEVICE={name}: {error}; or set MNN_DEVICE=cpu"


def on_cpu() -> bool:
    """Whether arrays live in host memory (numpy), where reading a value back to Python costs nothing.

    On a GPU (and on the strict stand-in) every ``float``/``int``/``bool`` of
    an array waits for the device and copies the value back; code that
    checks a value only to raise an error does it in one fused reduction
    there (:meth:`~mnn.layers.Embedding.check_ids`) or not at all.
    """
    return xp._module is numpy


def default_dtype():
    """The floating dtype new parameters and data are created with."""
    return _default_dtype


def set_default_dtype(dtype) -> None:
    """Set the floating dtype for new parameters (``float32`` or ``float64``)."""
    global _default_dtype
    dtype = numpy.dtype(dtype).type
    if dtype not in (numpy.float32, numpy.float64):
        raise ValueError(f"default dtype must be float32 or float64, got {numpy.dtype(dtype).name}")
    _default_dtype = dtype


def to_numpy(array):
    """Copy an array of the active device to host memory as a numpy array (deferred checks first)."""
    if isinstance(array, (numpy.ndarray, numpy.generic, int, float)):
        return numpy.asarray(array)
    if getattr(_deferred, "checks", None):
        read_scalar(xp.zeros(()))  # a check still waiting is settled before any value leaves the device
    return array.get()  # CuPy, and the strict stand-in



def defer_check(failed, explain) -> None:
    """Check ``failed`` (a 0-d boolean array) at the next value read back, not now.

    On the CPU reading a value costs nothing and ``explain()`` (which raises
    the error) runs now if ``failed`` is true. On a device each read waits for
    the device and copies the value back, so a check that only guards against
    bad input rides along with the next scalar the step reads anyway (the
    loss, in :func:`read_scalar`), in the same transfer: a token id out of
    range is refused before the backward pass and the optimizer step, with
    no read of its own.
    """
    if on_cpu():
        if bool(failed):
            explain()
        return
    if not hasattr(_deferred, "checks"):
        _deferred.checks = []
    _deferred.checks.append((failed, explain))


def read_scalar(value) -> float:
    """``float(value)`` of a 0-d array, the deferred checks of this thread read in the same transfer."""
    pending = getattr(_deferred, "checks", None)
    if not pending:
        return float(value)
    _deferred.checks = []
    values = xp.stack([xp.asarray(value, dtype=numpy.float64).reshape(())]
                      + [failed.astype(numpy.float64).reshape(()) for failed, _ in pending])
    values = values.get()  # one transfer for the value and every check
    for (_, explain), failed in zip(pending, values[1:]):
        if failed:
            explain()
    return float(values[0])


def asarray(array, dtype=None):
    """Move a host array (or anything array-like) onto the active device."""
    return xp.asarray(array, dtype=dtype)


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Ask glibc's ``malloc`` to keep freed activation-sized blocks for reuse instead of returning them.

    Every layer returns new arrays, and numpy takes each from ``malloc``. By
    default glibc serves blocks above ~128 KB with ``mmap`` and trims the heap
    when its top is free, so each training step hands its activations back to
    the kernel and page-faults them in again on the next one: about 10,000
    faults and a quarter of the time of the GPT training step (nanoGPT's CPU
    config, measured 90 -> 66 ms on one thread). Raising the two thresholds
    keeps those blocks in the process, as PyTorch's allocator does; the peak
    memory is unchanged, but memory freed after the peak stays with the
    process (up to ``trim_threshold``).

    Called once when :mod:`mnn.backend` is imported; set ``MNN_RETAIN_FREED_MEMORY=0``
    to opt out. Does nothing (and returns ``False``) off glibc; arrays on the
    GPU come from CuPy's own memory pool and are not affected.
    """
    if os.environ.get("MNN_RETAIN_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold))
                    and libc.mallopt(m_trim_threshold, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


MALLOC_RETAINS_FREED_MEMORY = retain_freed_memory()  # whether the call above took effect in this process

_use_environment()
