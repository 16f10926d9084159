r"""The array library every layer computes with: numpy on the CPU, CuPy on a GPU.

Layer code imports ``xp`` from here and never ``numpy`` directly, so the same
source runs on both devices::

    from mnn.backend import xp
    y = xp.maximum(x, 0)

``xp`` forwards attribute look-ups to the active module, so switching device
with :func:`use` takes effect everywhere at once. The device is chosen by
``use("cpu" | "gpu")``, the CLI's ``--device`` flag, or the ``MNN_DEVICE``
environment variable read at import. CuPy is imported only when asked for.

The default floating dtype is float32 (what training uses); gradient checks
switch to float64 with :func:`set_default_dtype` or by passing float64 arrays.
"""

from __future__ import annotations

import os

import numpy


class _ArrayModule:
    """A stand-in for ``numpy``/``cupy`` that forwards to whichever is active."""

    def __init__(self) -> None:
        self._module = numpy

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"<mnn array module: {self._module.__name__}>"


xp = _ArrayModule()
_default_dtype = numpy.float32
device = "cpu"


def use(name: str) -> None:
    """Select the device: ``"cpu"`` (numpy) or ``"gpu"`` (CuPy).

    Raises:
        ValueError: for any other name.
        RuntimeError: when ``"gpu"`` is asked for and CuPy cannot be imported.
    """
    global device
    if name == "cpu":
        xp._module = numpy
    elif name == "gpu":
        try:
            import cupy  # noqa: PLC0415 - optional, imported only on request
        except ImportError as error:
            raise RuntimeError(
                "device 'gpu' needs CuPy: pip install 'manual-nn[gpu]'"
            ) from error
        xp._module = cupy
    else:
        raise ValueError(f"unknown device {name!r}: expected 'cpu' or 'gpu'")
    device = name


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
    """Copy an array of the active device to host memory as a numpy array."""
    if isinstance(array, (numpy.ndarray, numpy.generic, int, float)):
        return numpy.asarray(array)
    return array.get()  # CuPy


def asarray(array, dtype=None):
    """Move a host array (or anything array-like) onto the active device."""
    return xp.asarray(array, dtype=dtype)


if os.environ.get("MNN_DEVICE"):
    use(os.environ["MNN_DEVICE"])
