r"""numpy's own OpenBLAS ``sgemm``, called directly where numpy's ``@`` would make a temporary.

A weight gradient accumulates (Eq. 3 of :class:`~mnn.layers.Linear`):

$$
\frac{\partial L}{\partial W} \mathrel{+}= G^\top X .
$$

Written ``grad += dy.T @ x``, numpy computes the product into a new array and
then adds it: one more pass over a weight-sized array, and an allocation, per
layer and step. BLAS's ``sgemm`` computes $C \leftarrow \alpha\, \mathrm{op}(A)\,
\mathrm{op}(B) + \beta C$; with $\beta = 1$ the product adds into the gradient
as it is formed. Measured on 2 cores of an Intel Xeon (OpenBLAS 0.3.31 on its
own SkylakeX kernel, 2026-12-01): the MLP's first layer, $G^\top X$ of ``(512, 256)`` by ``(512, 784)``,
700 us as ``+= @`` and 612 us in one call; at 64 rows 158 and 112 us.

The function called is the ``sgemm`` numpy itself links (its ILP64 build,
``scipy_cblas_sgemm64_``, found through threadpoolctl), so the arithmetic is
that of numpy's products, threadpoolctl's thread limits apply, and ctypes
releases the GIL for the call. Only the rounding differs from ``+= @``: the
sum is rounded once instead of twice. Where the symbol is missing (another
BLAS), for float64 (the gradient checks), non-contiguous arrays or a GPU,
callers keep numpy's expression.
"""

from __future__ import annotations

import ctypes
import threading

import numpy

from mnn.backend import on_cpu

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enums
_lookup = threading.Lock()
_address = False  # not looked up yet; then the address of sgemm, or None
_sgemm = None  # the ctypes function


def sgemm_address() -> int | None:
    """The address of ``cblas_sgemm`` (ILP64) in the OpenBLAS numpy loaded, or ``None``; looked up once."""
    global _address
    with _lookup:
        if _address is False:
            _address = _find()
    return _address


def _find() -> int | None:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 - a dependency of mnn

        paths = [info["filepath"] for info in threadpool_info() if info.get("internal_api") == "openblas"]
    except Exception:  # noqa: BLE001 - any failure to look means: numpy's expression
        return None
    paths.sort(key=lambda path: "numpy" not in path)  # numpy's own first (torch may bring another)
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):  # 64-bit integers, as declared below
            function = getattr(library, name, None)
            if function is not None:
                return ctypes.cast(function, ctypes.c_void_p).value
    return None


def _function():
    global _sgemm
    if _sgemm is None:
        i32, i64, f32, pointer = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        prototype = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, f32, pointer, i64, pointer, i64, f32,
                                     pointer, i64)  # CFUNCTYPE: the GIL is released during the call
        _sgemm = prototype(sgemm_address())
    return _sgemm


# Outputs smaller than this (elements) keep numpy's expression: there the temporary is cheap and the call
# through ctypes costs more (measured: a (10, 256) gradient from 64 rows, 3.6 us as += @, 7.0 us here).
MIN_SIZE = 16384


def can_accumulate(out, a, b) -> bool:
    """Whether :func:`add_at_b` takes these arrays: numpy float32, all C-contiguous, 2-D, an output of
    ``MIN_SIZE`` elements or more, sgemm found."""
    return (out.size >= MIN_SIZE and on_cpu() and out.dtype == a.dtype == b.dtype == numpy.float32
            and out.ndim == a.ndim == b.ndim == 2 and out.flags.c_contiguous and a.flags.c_contiguous
            and b.flags.c_contiguous and out.shape == (a.shape[1], b.shape[1]) and a.shape[0] == b.shape[0]
            and sgemm_address() is not None)


def add_at_b(out, a, b) -> None:
    """``out += a.T @ b`` in one ``sgemm`` call ($\\beta = 1$); check :func:`can_accumulate` first."""
    rows, m = a.shape
    n = b.shape[1]
    if rows == 0 or m == 0 or n == 0:
        return
    _function()(ROW_MAJOR, TRANS, NO_TRANS, m, n, rows, 1.0, a.ctypes.data, m, b.ctypes.data, n, 1.0,
                out.ctypes.data, n)
