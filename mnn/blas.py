r"""The BLAS mnn multiplies with: numpy's own OpenBLAS, or Intel's MKL when asked for.

**Which library.** By default every product is numpy's (``@``,
``numpy.matmul``), computed by the OpenBLAS numpy links. With
``MNN_BLAS=mkl`` in the environment (or :func:`use` before the first
product) the float32 products of :class:`~mnn.layers.Linear`,
:class:`~mnn.layers.MatrixProduct` and causal attention, :class:`~mnn.layers.Conv2d` and the compiled LSTM call
MKL's ``cblas_sgemm`` from the ``mkl`` package (``pip install 'mnn[mkl]'``)
on the same numpy arrays. Why: on Intel CPUs MKL is the faster kernel, and it
is the one PyTorch's CPU build computes with. Measured on 2 cores of an Intel
Xeon (2026-12-01, one thread, OpenBLAS 0.3.31 on its own SkylakeX kernel
against MKL 2026.2): the larger GPT's ``(1024, 384) @ (384, 1152)`` at 171
against 204 GFLOP/s, the small GPT's ``(768, 128) @ (128, 384)`` at 130
against 187. On AMD CPUs OpenBLAS's own kernel is the one to use.

**Threads.** MKL is loaded sequential (one thread per call), and its
products run where mnn multiplies on one thread (:func:`threads`): inside
:class:`~mnn.parallel.DataParallel`'s replicas, one core each, which is how
the GPT, CNN and LSTM recipes train. Where numpy's BLAS has more threads (a
single process, as the MLP trains), products stay numpy's: splitting them
over threads by hand was slower than OpenBLAS's own threads (measured: the
MLP's ``(512, 784) @ (784, 256)`` in 759 us as two halves of MKL in two
threads, 640 us with OpenBLAS on two threads, 1,182 us with MKL on one).

**Accumulation.** A weight gradient accumulates (Eq. 3 of
:class:`~mnn.layers.Linear`):

$$
\frac{\partial L}{\partial W} \mathrel{+}= G^\top X .
$$

Written ``grad += dy.T @ x``, numpy computes the product into a new array and
then adds it: one more pass over a weight-sized array, and an allocation, per
layer and step. ``sgemm`` computes $C \leftarrow \alpha\, \mathrm{op}(A)\,
\mathrm{op}(B) + \beta C$; with $\beta = 1$ the product adds into the gradient
as it is formed (:func:`add_at_b`, with either library). Measured on the same
Xeon with OpenBLAS: the MLP's first layer, $G^\top X$ of ``(512, 256)`` by
``(512, 784)``, 700 us as ``+= @`` and 612 us in one call; at 64 rows 158 and
112 us. Only the rounding differs from ``+= @``: the sum is rounded once
instead of twice.

The functions called are the ILP64 ``sgemm`` of each library (numpy's
``scipy_cblas_sgemm64_``, found through threadpoolctl; MKL's
``cblas_sgemm_64`` and ``cblas_sgemm_batch_strided_64``). Operands are read in
place when each matrix of the stack is row-major or the transpose of a
row-major one; anything else (float64 for the gradient checks, other layouts,
a GPU, no MKL) takes numpy's expression. Results with MKL differ from
OpenBLAS's in their last bits (another order of the sums), so checkpoints
resume exactly only on the library they were written with.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import itertools
import os
import re
import sys
import threading

import numpy

from mnn.backend import on_cpu, xp

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enums
LIBRARIES = ("numpy", "mkl")
_SEQUENTIAL = 1  # MKL_THREADING_SEQUENTIAL
_lookup = threading.Lock()
_library = None  # the chosen library's name, read from MNN_BLAS on first use
_found = {}  # library name -> the address of its ILP64 sgemm, or None
_functions = {}  # library name -> its sgemm as a ctypes function
_batched = None  # MKL's cblas_sgemm_batch_strided_64 (ctypes)
_mkl = None  # MKL's library, once loaded
_threads = None  # mnn's thread count: numpy's BLAS threads at first use, 1 inside replicas


def library() -> str:
    """The BLAS products run on: ``"numpy"`` (numpy's own) or ``"mkl"``; from ``MNN_BLAS`` unless :func:`use` chose."""
    global _library
    if _library is None:
        name = os.environ.get("MNN_BLAS", "numpy") or "numpy"
        if name not in LIBRARIES:
            raise ValueError(f"MNN_BLAS={name!r} is not a BLAS mnn knows: expected one of {LIBRARIES} (or unset it)")
        _library = name
    return _library


def use(name: str) -> None:
    """Choose the BLAS (``"numpy"`` or ``"mkl"``) before the first product; MKL must be installed."""
    global _library
    if name not in LIBRARIES:
        raise ValueError(f"blas.use: {name!r} is not a BLAS mnn knows: expected one of {LIBRARIES}")
    if name == "mkl":
        _address("mkl")  # fail now, in one line, where MKL is missing
    _library = name


def _in_use() -> str:
    """The library of this call: MKL where chosen and on one thread, numpy's OpenBLAS otherwise."""
    return "mkl" if library() == "mkl" and threads() == 1 else "numpy"


def _address(name: str) -> int | None:
    with _lookup:
        if name not in _found:
            _found[name] = _find_mkl() if name == "mkl" else _find_numpy()
    return _found[name]


def sgemm_address(name: str | None = None) -> int | None:
    """The address of ``name``'s ILP64 ``cblas_sgemm`` (default: the one a product here calls now, MKL's or
    numpy's), or ``None`` (numpy's expression); looked up once per library."""
    return _address(name or _in_use())


def _find_numpy() -> int | None:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415

        paths = [info["filepath"] for info in threadpool_info() if info.get("internal_api") == "openblas"]
    except Exception:  # noqa: BLE001 - any failure to look means: numpy's expression
        return None
    paths.sort(key=lambda path: "numpy" not in path)  # numpy's own first (torch may bring another)
    for path in paths:
        try:
            found = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_"):  # 64-bit integers, as declared below
            function = getattr(found, name, None)
            if function is not None:
                return ctypes.cast(function, ctypes.c_void_p).value
    return None


def mkl_path() -> str | None:
    """Where ``libmkl_rt`` is: the ``mkl`` package's (in this environment's ``lib``) or the system's."""
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, "/usr", "/usr/local", "/opt/intel/oneapi/mkl/latest")):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True)
        if found:
            return found[0]
    return None


def mkl_version() -> dict | None:
    """MKL's version and the instruction set its kernels run (``MKL_Get_Version``), once loaded; else None."""
    if _mkl is None:
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("update", ctypes.c_int),
                    ("status", ctypes.c_char_p), ("build", ctypes.c_char_p), ("processor", ctypes.c_char_p),
                    ("platform", ctypes.c_char_p)]

    version = Version()
    _mkl.MKL_Get_Version(ctypes.byref(version))
    processor = (version.processor or b"").decode(errors="replace")
    short = re.search(r"\(Intel\(R\) ([\w-]+)\)", processor)  # "... (Intel(R) AVX-512) with ..." -> AVX-512
    return {"library": "mkl", "version": f"{version.major}.{version.minor}.{version.update}",
            "kernel": short.group(1) if short else processor, "threads": 1, "file": os.path.basename(_mkl._name)}


def _find_mkl() -> int:
    global _batched, _mkl
    path = mkl_path()
    if path is None:
        raise RuntimeError("MNN_BLAS=mkl: libmkl_rt was not found; install it with pip install 'mnn[mkl]' "
                           "or unset MNN_BLAS")
    mkl = _mkl = ctypes.CDLL(path)
    mkl.MKL_Set_Threading_Layer(ctypes.c_int(_SEQUENTIAL))  # before any other call: one thread per call
    i32, i64, f32, pointer = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    prototype = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, f32, pointer, i64, i64, pointer, i64, i64,
                                 f32, pointer, i64, i64, i64)
    _batched = prototype(ctypes.cast(mkl.cblas_sgemm_batch_strided_64, ctypes.c_void_p).value)
    return ctypes.cast(mkl.cblas_sgemm_64, ctypes.c_void_p).value


def _function():
    """The ctypes ``sgemm`` a product here calls now (:func:`_in_use`)."""
    name = _in_use()
    if name not in _functions:
        i32, i64, f32, pointer = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        prototype = ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, f32, pointer, i64, pointer, i64, f32,
                                     pointer, i64)  # CFUNCTYPE: the GIL is released during the call
        _functions[name] = prototype(_address(name))
    return _functions[name]


# -- threads ---------------------------------------------------------------------------
def threads() -> int:
    """How many threads mnn's products may use: numpy's BLAS threads at first use, 1 inside replicas."""
    global _threads
    if _threads is None:
        try:
            from threadpoolctl import threadpool_info  # noqa: PLC0415

            counts = [info["num_threads"] for info in threadpool_info() if info.get("user_api") == "blas"]
        except Exception:  # noqa: BLE001
            counts = []
        _threads = max(counts, default=1)
    return _threads


def set_threads(count: int) -> None:
    """Set :func:`threads` (a replica process sets 1)."""
    global _threads
    _threads = max(1, int(count))


@contextlib.contextmanager
def limit(count: int):
    """:func:`threads` set to ``count`` inside the block (:class:`~mnn.parallel.DataParallel`'s replicas)."""
    before = threads()
    set_threads(count)
    try:
        yield
    finally:
        set_threads(before)


# -- products ----------------------------------------------------------------------------
# Outputs smaller than this (elements) keep numpy's ``+= @``: there the temporary is cheap and the call
# through ctypes costs more (measured: a (10, 256) gradient from 64 rows, 3.6 us as += @, 7.0 us here).
MIN_SIZE = 16384
MIN_MATRIX = 1 << 18  # multiply-adds per matrix (64^3) below which MKL's path keeps numpy's (numpy is faster there)


def _layout(x):
    """``(transpose flag, leading dimension)`` for a stack of float32 matrices sgemm reads in place, or None."""
    rows, cols = x.shape[-2:]
    row_stride, col_stride = x.strides[-2:]
    if col_stride == 4 and row_stride % 4 == 0 and row_stride // 4 >= max(1, cols):
        return NO_TRANS, row_stride // 4
    if row_stride == 4 and col_stride % 4 == 0 and col_stride // 4 >= max(1, rows):
        return TRANS, col_stride // 4
    return None


def _stack_stride(x) -> int | None:
    """The leading dimensions of ``x`` as one stride (elements) between matrices, or None if they do not collapse."""
    dims = [(n, s) for n, s in zip(x.shape[:-2], x.strides[:-2]) if n != 1]
    if not dims:
        return 0
    if any(s <= 0 for _, s in dims):  # broadcast or reversed: numpy's
        return None
    for (_, outer), (n, inner) in itertools.pairwise(dims):
        if outer != inner * n:
            return None
    return dims[-1][1] // 4 if dims[-1][1] % 4 == 0 else None


def _readable(x) -> bool:
    return isinstance(x, numpy.ndarray) and x.dtype == numpy.float32 and _layout(x) is not None


def matmul(a, b, out=None):
    """``a @ b`` (into ``out`` when given, which must not overlap them), as ``numpy.matmul``: through MKL when
    chosen, on one thread (:func:`threads`), and the operands allow (same leading dimensions, or a stack of rows
    by one matrix, each matrix of ``MIN_MATRIX`` multiply-adds or more)."""
    if _mkl_reads(a, b):
        if b.ndim == 2 and a.ndim > 2 and a.flags.c_contiguous:  # (..., k) rows by one matrix: one product
            flat = None if out is None or not out.flags.c_contiguous else out.reshape(-1, out.shape[-1])
            if out is None or flat is not None:
                return matmul(a.reshape(-1, a.shape[-1]), b, flat).reshape(a.shape[:-1] + b.shape[-1:])
        if _mkl_multiplies(a, b, out):
            result = numpy.empty(a.shape[:-1] + b.shape[-1:], dtype=numpy.float32) if out is None else out
            if _multiply(a, b, result, 0.0):
                return result
    return xp.matmul(a, b, out=out)


def add_matmul(out, a, b) -> None:
    """``out += a @ b``: one ``sgemm`` with $\\beta = 1$ where :func:`matmul` would call MKL (and ``out`` is
    row-major), else numpy's ``out += a @ b`` (a temporary, then the sum)."""
    if _mkl_reads(a, b) and _mkl_multiplies(a, b, out) and _multiply(a, b, out, 1.0):
        return
    out += xp.matmul(a, b)


def _mkl_reads(a, b) -> bool:
    """Whether this product may go to MKL: chosen, on one thread, on the CPU, float32 stacks of matrices sgemm
    reads in place."""
    return library() == "mkl" and threads() == 1 and on_cpu() and _readable(a) and _readable(b) and a.ndim >= 2


def _mkl_multiplies(a, b, out) -> bool:
    """Whether sgemm takes ``a @ b`` (:func:`_mkl_reads`) into ``out`` (None: a new array): the same leading
    dimensions, ``MIN_MATRIX`` multiply-adds or more per matrix, ``out`` row-major of the product's shape."""
    shape = a.shape[:-1] + b.shape[-1:]
    return (a.ndim == b.ndim and a.shape[:-2] == b.shape[:-2] and a.shape[-1] == b.shape[-2]
            and a.shape[-2] * a.shape[-1] * b.shape[-1] >= MIN_MATRIX
            and (out is None or (out.shape == shape and _readable(out) and _layout(out)[0] == NO_TRANS))
            and sgemm_address() is not None)


def _multiply(a, b, out, beta: float) -> bool:
    """``out = a @ b + beta * out`` through sgemm; False (nothing written) where the stack does not collapse."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if a.ndim == 2:
        _gemm_2d(a, b, out, beta)
        return True
    strides = [_stack_stride(x) for x in (a, b, out)]
    if None in strides:  # e.g. heads merged into (B, T, H, D): one call per leading index
        if a.ndim == 3 or a.shape[0] == 0:
            return False
        parts = [(a[i], b[i], out[i]) for i in range(a.shape[0])]
        if not all(None not in (_stack_stride(x), _stack_stride(y), _stack_stride(z)) for x, y, z in parts):
            return False
        for x, y, z in parts:
            _multiply(x, y, z, beta)
        return True
    count = out.size // max(1, m * n)
    if not (count and m and n):
        return True
    (ta, lda), (tb, ldb), (_, ldc) = _layout(a), _layout(b), _layout(out)
    (sa, sb, sc), (pa, pb, pc) = strides, (a.ctypes.data, b.ctypes.data, out.ctypes.data)
    if sc >= ldc * m:  # one batched call; it wants its outputs apart, not interleaved (heads side by side)
        _batched(ROW_MAJOR, ta, tb, m, n, k, 1.0, pa, lda, sa, pb, ldb, sb, beta, pc, ldc, sc, count)
        return True
    for i in range(count):
        _function()(ROW_MAJOR, ta, tb, m, n, k, 1.0, pa + 4 * i * sa, lda, pb + 4 * i * sb, ldb, beta,
                    pc + 4 * i * sc, ldc)
    return True


def _gemm_2d(a, b, out, beta) -> None:
    """``out = a @ b + beta * out`` for 2-D operands in one call."""
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if m and n:
        (ta, lda), (tb, ldb), (_, ldc) = _layout(a), _layout(b), _layout(out)
        _function()(ROW_MAJOR, ta, tb, m, n, k, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, beta,
                    out.ctypes.data, ldc)


def can_accumulate(out, a, b) -> bool:
    """Whether :func:`add_at_b` takes these arrays: numpy float32, all C-contiguous, 2-D, an output of
    ``MIN_SIZE`` elements or more, sgemm found."""
    return (out.size >= MIN_SIZE and on_cpu() and out.dtype == a.dtype == b.dtype == numpy.float32
            and out.ndim == a.ndim == b.ndim == 2 and out.flags.c_contiguous and a.flags.c_contiguous
            and b.flags.c_contiguous and out.shape == (a.shape[1], b.shape[1]) and a.shape[0] == b.shape[0]
            and sgemm_address() is not None)


def add_at_b(out, a, b) -> None:
    """``out += a.T @ b`` in one ``sgemm`` call ($\\beta = 1$); check :func:`can_accumulate` first (shapes that
    do not fit are refused here too: sgemm would read and write past the arrays)."""
    if out.shape != (a.shape[1], b.shape[1]) or a.shape[0] != b.shape[0]:
        raise ValueError(f"add_at_b: out {out.shape} += a.T @ b with a {a.shape} and b {b.shape}: the shapes do "
                         "not fit")
    if a.shape[0] and out.size:
        _gemm_2d(a.T, b, out, 1.0)
