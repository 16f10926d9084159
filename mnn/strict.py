r"""A strict stand-in for a GPU: numpy arrays that, like CuPy's, refuse to cross to the host unasked.

The machines mnn is built on have no GPU, yet mnn promises ``--device gpu``
(CuPy). What breaks on a GPU is almost never the arithmetic: it is a hidden
crossing between device and host, which CuPy refuses (``numpy.asarray`` of a
CuPy array raises) or which silently synchronises (``float`` of a 0-d array),
and a ``numpy`` call in layer code where ``xp`` was meant. This module makes
both visible on the CPU. ``mnn.use("strict")`` (or ``MNN_DEVICE=strict``)
selects :data:`module`, an array module whose arrays are :class:`StrictArray`:
a numpy array behind a type that

* refuses every implicit conversion to the host: ``numpy.asarray(a)``
  (``__array__``), a ``numpy`` function or ufunc called on it
  (``numpy.sqrt(a)``, ``numpy.concatenate([a])``), ``a.tolist()``,
  ``a.tobytes()``, mixing it with a ``numpy.ndarray`` (``a + host``,
  ``a[...] = host``, ``a[host_index]``), and ``float``/``int``/``bool`` of an
  array of more than one element;
* refuses a ``numpy.ndarray`` given to any function of the module except
  ``asarray``/``array`` (CuPy's functions do the same);
* allows, and counts, what CuPy allows: ``float(a)``, ``int(a)``,
  ``bool(a)`` and ``a.item()`` of a one-element array (each a
  synchronisation: the value is copied to the host), and the explicit
  crossings ``a.get()`` (what :func:`mnn.backend.to_numpy` calls) and
  ``asarray(host)`` (:func:`mnn.backend.asarray`).

Reductions return 0-d arrays, never numpy scalars, as CuPy's do, so a
``float(loss)`` is a counted crossing. Compiled loops (:mod:`mnn.jit`, numba)
are off on this device, as on a GPU, so the pure-``xp`` path of every layer
runs. The arithmetic is numpy's: results equal the CPU path's bit for bit.

:data:`counts` holds the crossings since :func:`reset_counts`:
``to_host`` (``get``, ``float``/``int``/``bool``/``item``) and ``to_device``
(``asarray``/``array`` of host data). A training step of a language model
makes two host crossings, its loss and its gradient norm (the two scalars
the loop checks and logs), and two device crossings, the batch's inputs and
targets (``tests/test_strict_device.py`` holds it to that).

For the test suite only, :func:`allow_outside_library` relaxes the refusals
for callers outside the ``mnn`` package: a test may hand host arrays to a
layer and compare its outputs with ``numpy.testing``; those crossings are
counted apart, in ``counts["outside"]``. Inside ``mnn`` everything stays strict.
"""

from __future__ import annotations

import sys
import types

import numpy

counts = {"to_host": 0, "to_device": 0, "outside": 0}
_lenient_outside = False  # whether callers outside mnn may cross implicitly (the test suite's boundary)
# numpy names CuPy does not have: calling them through the module is refused as CuPy would (AttributeError)
_NOT_IN_CUPY = frozenset({"errstate", "seterr", "geterr", "seterrcall", "geterrcall", "frompyfunc",
                          "set_printoptions", "get_printoptions", "printoptions", "memmap", "fromfile",
                          "load", "save", "savez", "loadtxt", "savetxt", "genfromtxt"})


class HostCrossingError(TypeError):
    """An implicit conversion between the (stand-in) device and the host, which CuPy would refuse."""


def reset_counts() -> dict:
    """Zero :data:`counts` and return what it held."""
    previous = dict(counts)
    for key in counts:
        counts[key] = 0
    return previous


def allow_outside_library(flag: bool) -> bool:
    """Let code outside the ``mnn`` package (tests) cross implicitly, counted in ``counts["outside"]``; returns the previous setting."""
    global _lenient_outside
    previous, _lenient_outside = _lenient_outside, bool(flag)
    return previous


def _caller_outside_library() -> bool:
    """Whether the innermost frame that is neither numpy's nor this module's belongs to code outside ``mnn``."""
    if not _lenient_outside:
        return False
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("numpy") or name == __name__):
            return not (name == "mnn" or name.startswith("mnn."))
        frame = frame.f_back
    return True


def _refuse(what: str):
    """Raise :class:`HostCrossingError` for ``what``, unless a caller outside mnn may cross (then count it)."""
    if _caller_outside_library():
        counts["outside"] += 1
        return
    raise HostCrossingError(f"{what}: an implicit conversion between the device and the host, which CuPy refuses; "
                            "use mnn.backend.to_numpy / mnn.backend.asarray (or xp instead of numpy)")


def _unwrap(value, context: str):
    """The numpy array behind ``value`` (recursively in tuples and lists); a host ``numpy.ndarray`` is refused."""
    if type(value) is StrictArray:
        return value._array
    if isinstance(value, numpy.ndarray):
        _refuse(f"a numpy.ndarray given to {context}")
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(item, context) for item in value)
    return value


def _wrap(value):
    """numpy arrays and scalars as :class:`StrictArray` (a scalar as a 0-d array, as CuPy's reductions return)."""
    if isinstance(value, numpy.ndarray):
        return StrictArray(value)
    if isinstance(value, numpy.generic):
        return StrictArray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(item) for item in value)
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


def _call(function, name: str, args, kwargs):
    out = kwargs.get("out")
    args = _unwrap(args, name)
    kwargs = {key: _unwrap(value, name) for key, value in kwargs.items()}
    result = function(*args, **kwargs)
    if type(out) is StrictArray and result is out._array:  # out=: the same device array back, as CuPy
        return out
    return _wrap(result)


def _binary(name: str):
    method = getattr(numpy.ndarray, name)

    def operator(self, other):
        if isinstance(other, numpy.ndarray):  # numpy's operators on (host, device) come here too
            _refuse(f"{name} of a device array and a numpy.ndarray")
            if name.startswith("__i"):  # outside mnn: in place, or a host result
                method(self._array, other)
                return self
            return method(self._array.copy(), other)
        if not isinstance(other, (StrictArray, int, float, complex, bool, numpy.generic)):
            return NotImplemented
        result = method(self._array, other._array if type(other) is StrictArray else other)
        if result is NotImplemented:
            return result
        if name.startswith("__i"):  # in place: the same device array
            return self
        return _wrap(result)

    operator.__name__ = name
    return operator


class StrictArray:
    """A numpy array on the stand-in device: what :data:`module`'s functions take and return (see the module docstring)."""

    __slots__ = ("_array", "__weakref__")
    __hash__ = None

    def __init__(self, array) -> None:
        self._array = array

    # -- the explicit crossings ------------------------------------------------
    def get(self) -> numpy.ndarray:
        """A host copy (CuPy's ``ndarray.get``): the crossing :func:`mnn.backend.to_numpy` makes."""
        counts["to_host"] += 1
        return numpy.array(self._array, copy=True)

    def _scalar(self, kind, what: str):
        if self._array.size != 1:
            _refuse(f"{what} of an array of shape {self._array.shape}")
            return kind(self._array)  # outside mnn: numpy's own answer (an error for float, int)
        counts["to_host"] += 1  # a synchronisation: the value is read back, as CuPy allows
        return kind(self._array.reshape(()).item() if kind is not bool else self._array.reshape(()))

    def item(self):
        """The one element as a Python number: a counted crossing (a synchronisation on a GPU)."""
        return self._scalar(lambda a: a, "item()")

    def __float__(self) -> float:
        return self._scalar(float, "float()")

    def __int__(self) -> int:
        return self._scalar(int, "int()")

    def __bool__(self) -> bool:
        return self._scalar(bool, "bool()")

    def __index__(self) -> int:
        _refuse("using a device array as a Python index")
        return _operator_index(self._array)

    def __complex__(self) -> complex:
        return self._scalar(complex, "complex()")

    # -- the implicit crossings CuPy refuses -------------------------------------
    def __array__(self, dtype=None, copy=None):
        _refuse("numpy.asarray (__array__) of a device array")
        return numpy.asarray(self._array, dtype=dtype)

    def __array_ufunc__(self, ufunc, method: str, *inputs, **kwargs):
        """A numpy ufunc given a device array: refused, except a numpy scalar's operator (``numpy.float32(2) * a``).

        CuPy would run ``numpy.sqrt(a)`` on the device; mnn's layer code
        calls ``xp``, so here a ``numpy`` ufunc in layer code is an error. A
        numpy scalar on the left of an operator reaches numpy's ufunc too and
        is a device operation (CuPy takes numpy scalars), so it runs.
        """
        scalars = (int, float, complex, bool, numpy.generic)
        if (method == "__call__" and not kwargs and any(isinstance(x, numpy.generic) for x in inputs)
                and all(type(x) is StrictArray or isinstance(x, scalars) for x in inputs)):
            return _wrap(ufunc(*(_to_host(x) for x in inputs)))
        _refuse(f"numpy.{ufunc.__name__}{'' if method == '__call__' else '.' + method} called on a device array")
        kwargs = {key: _to_host(value) for key, value in kwargs.items()}
        return getattr(ufunc, method)(*(_to_host(x) for x in inputs), **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        _refuse(f"numpy.{func.__name__} called on a device array")
        args = _to_host(args)
        kwargs = {key: _to_host(value) for key, value in kwargs.items()}
        return func(*args, **kwargs)

    def tolist(self):
        _refuse("tolist() of a device array")
        return self._array.tolist()

    def tobytes(self, *args, **kwargs):
        _refuse("tobytes() of a device array")
        return self._array.tobytes(*args, **kwargs)

    def __format__(self, spec: str) -> str:
        if not spec:
            return repr(self)
        _refuse("formatting a device array's value")
        return format(self._array.reshape(()).item() if self._array.size == 1 else self._array, spec)

    def __repr__(self) -> str:
        return "strict_" + repr(self._array).replace("\n", "\n       ")

    # -- the array interface CuPy shares with numpy ------------------------------
    @property
    def shape(self) -> tuple:
        return self._array.shape

    @shape.setter
    def shape(self, value) -> None:
        self._array.shape = value

    @property
    def T(self) -> "StrictArray":  # noqa: N802 - numpy's name
        return StrictArray(self._array.T)

    @property
    def device(self) -> str:
        return "strict"

    def __getattr__(self, name: str):
        if name.startswith("__") or name in {"ctypes", "tofile", "dump", "dumps"}:
            raise AttributeError(name)
        value = getattr(self._array, name)
        if callable(value):
            def method(*args, **kwargs):
                return _call(value, f"ndarray.{name}", args, kwargs)
            return method
        return _wrap(value) if isinstance(value, numpy.ndarray) else value

    def __len__(self) -> int:
        return len(self._array)

    def __iter__(self):
        for index in range(len(self._array)):
            yield _wrap(self._array[index])

    def __getitem__(self, key):
        key = _unwrap(key, "indexing a device array")
        try:
            return _wrap(self._array[key])
        except IndexError:  # CuPy wraps integer-array indices out of range around instead of raising
            return _wrap(self._array[_wrapped_indices(key, self._array.shape)])

    def __setitem__(self, key, value) -> None:
        self._array[_unwrap(key, "indexing a device array")] = _unwrap(value, "assigning into a device array")

    def __copy__(self) -> "StrictArray":
        return StrictArray(self._array.copy())

    def __deepcopy__(self, memo) -> "StrictArray":
        return StrictArray(self._array.copy())

    def __reduce__(self):
        return (StrictArray, (self._array.copy(),))

    def __neg__(self):
        return _wrap(-self._array)

    def __pos__(self):
        return _wrap(+self._array)

    def __abs__(self):
        return _wrap(abs(self._array))

    def __invert__(self):
        return _wrap(~self._array)


for _name in ["add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"]:
    for _form in ("__{}__", "__r{}__", "__i{}__"):
        setattr(StrictArray, _form.format(_name), _binary(_form.format(_name)))
for _name in ["lt", "le", "eq", "ne", "gt", "ge"]:
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))


def _operator_index(array) -> int:
    import operator  # noqa: PLC0415

    return operator.index(array)


def _to_host(value):
    """Host copies of the device arrays in ``value`` (only where a caller outside mnn may cross)."""
    if type(value) is StrictArray:
        return value._array
    if isinstance(value, (tuple, list)):
        return type(value)(_to_host(item) for item in value)
    return value


class _Function:
    """A numpy function or ufunc seen through the strict module: device arrays in, device arrays out."""

    def __init__(self, function, name: str) -> None:
        self._function, self.__name__ = function, name

    def __call__(self, *args, **kwargs):
        return _call(self._function, self.__name__, args, kwargs)

    def __getattr__(self, name: str):  # ufunc methods: add.reduceat, add.at, maximum.reduce ...
        value = getattr(self._function, name)
        return _Function(value, f"{self.__name__}.{name}") if callable(value) else value


def _asarray(function_name: str):
    function = getattr(numpy, function_name)

    def convert(a, dtype=None, *args, **kwargs):
        if type(a) is StrictArray:
            return _wrap(function(a._array, dtype, *args, **kwargs))
        if isinstance(a, (tuple, list)) and any(type(item) is StrictArray for item in a):
            return _wrap(function(_unwrap(a, function_name), dtype, *args, **kwargs))
        counts["to_device"] += 1  # host data (an array, a list, a number) copied to the device
        return StrictArray(numpy.array(function(a, dtype, *args, **kwargs), copy=True))

    convert.__name__ = function_name
    return convert


class _Namespace(types.ModuleType):
    """numpy, or one of its submodules (``linalg``), as the strict device's array module."""

    def __init__(self, name: str, source) -> None:
        super().__init__(name)
        self._source = source

    def __getattr__(self, name: str):
        if name in _NOT_IN_CUPY:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (CuPy has none either)")
        value = getattr(self._source, name)
        if isinstance(value, types.ModuleType):
            value = _Namespace(f"{self.__name__}.{name}", value)
        elif isinstance(value, numpy.ufunc) or (callable(value) and not isinstance(value, type)):
            value = _Function(value, name)
        setattr(self, name, value)  # looked up once
        return value


def _wrapped_indices(key, shape):
    """``key`` with each integer-array index taken modulo its axis's length, as CuPy's indexing does."""
    parts = key if isinstance(key, tuple) else (key,)
    if any(part is Ellipsis or part is None for part in parts):
        raise IndexError(f"index out of range in {key!r}")
    return tuple(part % shape[axis] if isinstance(part, numpy.ndarray) and part.dtype.kind in "iu" else part
                 for axis, part in enumerate(parts))


def _take(a, indices, axis=None, out=None, mode="wrap"):
    """CuPy's ``take``: an index out of range wraps around (CuPy has no ``"raise"`` mode), as on a GPU."""
    return numpy.take(a, indices, axis=axis, out=out, mode=mode)


module = _Namespace("mnn.strict", numpy)
module.take = _Function(_take, "take")
module.ndarray = StrictArray
module.asarray = _asarray("asarray")
module.array = _asarray("array")
module.asanyarray = module.asarray
