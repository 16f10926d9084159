"""Fixtures shared by the test files, and the host boundary of the strict device (``MNN_DEVICE=strict``)."""

import functools
import sys

import numpy
import pytest

from mnn import backend, jit

STRICT = backend.device == "strict"  # the suite runs on mnn.strict's stand-in for a GPU (tests/test_strict_device.py)


@pytest.fixture(params=["numpy", "jit"])
def compute_path(request):
    """Run a test once on the pure-numpy code and once on the compiled loops of mnn.jit (numba: a test extra)."""
    if STRICT and request.param == "jit":
        pytest.skip("no compiled loops on the strict device (as on a GPU)")
    previous = jit.set_enabled(request.param == "jit")
    try:
        assert jit.enabled() == (request.param == "jit"), "numba is a test dependency: the compiled path must run"
        yield request.param
    finally:
        jit.set_enabled(previous)


def _to_device(value):
    if isinstance(value, numpy.ndarray):
        backend.strict.counts["outside"] += 1
        return backend.strict.StrictArray(numpy.array(value))
    if isinstance(value, tuple):
        return tuple(_to_device(item) for item in value)
    return value


def _host_boundary(method):
    """``method`` taking host arrays from a test: they move to the device when the caller is outside mnn."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if backend.device == "strict" and not (caller == "mnn" or caller.startswith("mnn.")):
            args = _to_device(args)
            kwargs = {key: _to_device(value) for key, value in kwargs.items()}
        return method(self, *args, **kwargs)

    wrapped.host_boundary = True
    return wrapped


def _install_host_boundary() -> None:
    """On the strict device, let tests hand host arrays to modules and read results with numpy.

    Inside mnn every implicit crossing stays an error; a test's own numpy
    inputs move to the device where they enter a module's ``forward``,
    ``backward``, ``forward_cached`` or ``step`` from outside the package,
    and its numpy reads of the results are allowed (``mnn.strict.counts["outside"]``).
    """
    import mnn.layers  # noqa: F401, PLC0415 - every Module subclass defined before wrapping
    import mnn.losses  # noqa: F401, PLC0415
    import mnn.models  # noqa: F401, PLC0415
    from mnn import strict  # noqa: PLC0415
    from mnn.module import Module  # noqa: PLC0415

    backend.strict = strict
    strict.allow_outside_library(True)

    def wrap(cls) -> None:
        for name in ("forward", "backward", "forward_cached", "step"):
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "host_boundary", False):
                setattr(cls, name, _host_boundary(method))

    from mnn.parallel import DataParallel  # noqa: PLC0415

    for name in ("forward_backward", "evaluate"):
        setattr(DataParallel, name, _host_boundary(getattr(DataParallel, name)))
    pending = [Module]
    while pending:
        cls = pending.pop()
        wrap(cls)
        pending.extend(cls.__subclasses__())
    original = Module.__dict__.get("__init_subclass__")

    def init_subclass(cls, **kwargs):
        if original is not None:
            original.__func__(cls, **kwargs)
        wrap(cls)

    Module.__init_subclass__ = classmethod(init_subclass)


if STRICT:
    _install_host_boundary()
