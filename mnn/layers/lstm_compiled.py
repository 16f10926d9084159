r"""The LSTM's two time loops compiled (numba): one call for the forward loop, one for the backward, in float32.

Read :mod:`mnn.layers.lstm` first: it is the reference, and this module
computes the same equations (cited by their numbers there) in the same order.

Why. A layer's time loop in numpy is a handful of small calls per step (the
product with $W_{hh}$, the ``tanh``, the cell update, ...), each a few
microseconds, and each takes Python's global interpreter lock (GIL) between
two pieces of work. :class:`~mnn.parallel.DataParallel` runs replicas in
threads; with the LSTM language model at batch 12 (a slice of 6 rows per
replica, $H = 256$, $T = 64$, 2 layers) the two threads spent about a third
of the step waiting for each other's lock (35.8 ms a step as threads against
22.5 ms as two processes, 2026-12). Here the whole loop of one layer and one
direction is one compiled call that releases the lock: the two replicas run
truly in parallel, and the per-call overhead of numpy is gone.

How.

- The product with $W_{hh}$ of every step (Eqs. 1 and 9 of
  :class:`~mnn.layers.LSTM`) calls OpenBLAS's ``cblas_sgemm`` directly: the
  one numpy itself uses (its ILP64 build, ``scipy_cblas_sgemm64_``, found
  through threadpoolctl), so the numbers are those of numpy's products and the
  thread limits of :class:`~mnn.parallel.DataParallel` apply. It multiplies
  column blocks of $W_{hh}$ (copied once per call, ``BLOCK`` = 32 columns each)
  that stay under OpenBLAS's small-matrix size, as
  :class:`~mnn.layers.rnn.StepProduct` does, and with $\beta = 1$ the
  forward's product adds straight into the step's input terms.
- ``tanh`` (Eqs. 2 and 4): numba's ``math.tanh`` calls the C library one
  element at a time (about 10 ns an element here, against 0.3 ns for numpy's
  vectorised one), so :func:`tanh` below is written in plain float32
  arithmetic that the compiler vectorises, at most 2.4 units in the last place
  from the exact value (``tests/test_rnn.py`` checks it over a dense grid; numpy's
  own float32 ``tanh`` is within 1.4).
- The element-wise equations are the reference's, in float32 with the same
  order of operations (no fused multiply-adds), so the backward's cell (Eqs.
  5-8) gives the same bits as numpy's given the same inputs; only ``tanh``
  differs in its last bits.

Where it runs: float32 arrays, numba installed and on (:mod:`mnn.jit`), and
an OpenBLAS exporting the ILP64 ``sgemm``; everything else (float64 for the
gradient checks, a GPU, another BLAS) takes the numpy loops of
:mod:`mnn.layers.lstm`. The tests compare the two paths and PyTorch.
"""

from __future__ import annotations

import math
import threading

import numpy

from mnn import blas, jit
from mnn.layers.input_projection import TableLookup

# Columns of W_hh per sgemm call. Measured here (one thread, 2026-12, H 256, whole loops): at 6 rows
# forward 27 us a step with 32 columns (16: 29, 64: 31, 128: 35), backward 22 (16: 27, 64: 30);
# at 16 rows forward 75 (16: 97, 64: 74, 128: 76), backward 74 (16: 95, 64: 98, 128: 96).
BLOCK = 32
_SYMBOL = "mnn_cblas_sgemm"  # the name the kernels call sgemm by, bound to OpenBLAS's address
_ready = None  # None: not looked for yet; True/False: whether the kernels can run
_lookup = threading.Lock()

# cblas arguments (enums are C ints) and float32 constants: numba keeps float32 arithmetic float32
# only when every operand is float32 (a Python float would make it float64).
ROW_MAJOR, NO_TRANS, TRANS = numpy.int32(101), numpy.int32(111), numpy.int32(112)
ZERO, HALF, ONE, TWO = numpy.float32(0.0), numpy.float32(0.5), numpy.float32(1.0), numpy.float32(2.0)
_CLAMP = numpy.float32(9.5)  # tanh(9.5) = 1 - 1.1e-8 rounds to 1 in float32: larger |x| use 9.5
_INV_LN2 = numpy.float32(1.0 / math.log(2.0))
_LN2_HI = numpy.float32(0.693145751953125)  # ln 2 to 15 significant bits: k ln2_hi is exact for k < 512
_LN2_LO = numpy.float32(math.log(2.0) - 0.693145751953125)
_C3, _C4, _C5, _C6, _C7 = (numpy.float32(1.0 / math.factorial(n)) for n in range(3, 8))
_EXPONENT_BIAS, _MANTISSA_BITS = numpy.int32(127), numpy.int32(23)
_sgemm = None  # numba's handle on sgemm, and the compiled tanh: set by can_run() when numba is there
_tanh = None


def _tanh_scalar(x):
    """``tanh`` of one float32, as :func:`tanh_float32` derives it; compiled by :func:`can_run`."""
    ax = x if x >= ZERO else -x
    y = TWO * ax if ax < _CLAMP else TWO * _CLAMP
    k = numpy.floor(y * _INV_LN2 + HALF)
    r = (y - k * _LN2_HI) - k * _LN2_LO
    em1 = r + r * r * (HALF + r * (_C3 + r * (_C4 + r * (_C5 + r * (_C6 + r * _C7)))))  # e^r - 1
    scale = numpy.int32((numpy.int32(k) + _EXPONENT_BIAS) << _MANTISSA_BITS).view(numpy.float32)  # 2^k
    e = scale * em1 + (scale - ONE)  # expm1(y)
    t = e / (e + TWO)
    return t if x >= ZERO else (-t if x < ZERO else x)  # x NaN: neither branch, NaN out


def can_run(*arrays) -> bool:
    """Whether the compiled loops take these arrays: :func:`mnn.jit.usable`, all float32, sgemm found."""
    global _ready
    if not (jit.usable(*arrays) and all(array.dtype == numpy.float32 for array in arrays)):
        return False
    with _lookup:  # once per process, whichever replica's thread comes first
        if _ready is None:
            _ready = _bind()
    return _ready


def _bind() -> bool:
    """Make sgemm callable from the kernels and compile the ``tanh``; False (the numpy loops) where it cannot."""
    global _sgemm, _tanh
    address = blas.sgemm_address(blas.library())  # numpy's OpenBLAS, or MKL where chosen (mnn.blas)
    if address is None:
        return False
    try:
        import llvmlite.binding  # noqa: PLC0415 - comes with numba
        from numba import njit, types  # noqa: PLC0415

        llvmlite.binding.add_symbol(_SYMBOL, address)  # before any kernel is compiled or loaded from cache
        pointer, i32, i64, f32 = types.voidptr, types.int32, types.int64, types.float32
        _sgemm = types.ExternalFunction(_SYMBOL, types.void(i32, i32, i32, i64, i64, i64, f32, pointer, i64,
                                                            pointer, i64, f32, pointer, i64))
        _tanh = njit(error_model="numpy", fastmath={"contract"})(_tanh_scalar)  # FMAs: 15% faster
    except Exception:  # noqa: BLE001 - a numba without these interfaces: the numpy loops
        return False
    return True


def _column_blocks(w):
    """``w (K, N)`` as ``(N / BLOCK, K, BLOCK)`` contiguous column blocks (one block where BLOCK does not divide N)."""
    K, N = w.shape
    width = BLOCK if N % BLOCK == 0 else N
    return numpy.ascontiguousarray(w.reshape(K, N // width, width).transpose(1, 0, 2))


def forward_loop(gates, bias, w_hh_t, h, c, tanh_c) -> None:
    r"""The forward time loop of one layer and direction, Eqs. (1)-(4) of :class:`~mnn.layers.LSTM`, in place.

    Each step adds the bias, then $h_{t-1} W_{hh}^\top$ ($\beta = 1$), to its
    input products, as the reference's ``(x W_ih^T + b) + h W_hh^T``, while
    they are in cache (no pass of its own over all steps).

    Args:
        gates: ``(T, B, 4H)``: in, $x_t W_{ih}^\top$ of every step; out, the gates
            $i, f, g, o$ of every step (the backward's cache). Like ``bias`` and
            ``w_hh_t``, with the $i, f, o$ parts halved, as in the reference:
            $\sigma(a) = \tfrac12(1 + \tanh(a/2))$.
        bias: ``(4H,)``, $b_{ih} + b_{hh}$ halved likewise, or ``None``.
        w_hh_t: $W_{hh}^\top$ ``(H, 4H)``, its $i, f, o$ columns halved.
        h: ``(T+1, B, H)``, ``h[0]`` given; ``h[1:]`` written.
        c: ``(T+1, B, H)``, ``c[0]`` given; ``c[1:]`` written.
        tanh_c: ``(T, B, H)``, written: $\tanh c_t$.
    """
    bias = numpy.zeros(0, gates.dtype) if bias is None else numpy.ascontiguousarray(bias)
    _forward_kernel(gates, bias, _column_blocks(w_hh_t), h, c, tanh_c)


def backward_loop(gates, c, tanh_c, doutput, dh, dc, dgates, weights, grads, x, h_prev):
    r"""The backward time loop of one layer and direction, Eqs. (5)-(9) of :class:`~mnn.layers.LSTM`, in place,
    then Eq. (10); returns $\partial L / \partial X$ ``(T, B, in)`` (``None`` for a ``TableLookup`` ``x``).

    The loop also sums each step's $\partial L / \partial a_t$ over its rows
    (the biases' gradient $\mathbf{1}^\top G$, in float64, while they are in
    cache). After it, $G^\top X$ and $G^\top H_{-1}$ ($G$ = ``dgates`` as
    ``(T B, 4H)``) are added into the weights' gradients by the product itself
    ($\beta = 1$: no temporary, no extra pass), and $G W_{ih}$ is numpy's.

    When ``x`` is a :class:`~mnn.layers.input_projection.TableLookup` (layer 0
    reading an embedding's ids), the loop sums the rows per id instead, into
    $\partial L / \partial P = S^\top G$ ``(V, 4H)`` (Eq. 3 there), the bias's
    sum being $\mathbf{1}_V^\top S^\top G$ (Eq. 6); $G^\top X$ and $G W_{ih}$
    become the $V$-row products of Eqs. (4)-(5) there.

    Args:
        gates, c, tanh_c: the forward's cache (see :func:`forward_loop`).
        doutput: ``(T, B, H)``, the gradient of the layer's output at every step.
        dh, dc: ``(B, H)``: in, the gradients of the final state; out, those of the initial state.
        dgates: ``(T, B, 4H)``, written: $G$, $\partial L / \partial a_t$ of every step.
        weights: ``[W_ih, W_hh, b_ih, b_hh]`` (biases ``None`` without bias).
        grads: their gradients, accumulated into.
        x: ``(T, B, in)``, the layer's input, or a ``TableLookup``; h_prev: ``(T, B, H)``, $h_0, \dots, h_{T-1}$.
    """
    (w_ih, w_hh, _, _), (dw_ih, dw_hh, db_ih, db_hh) = weights, grads
    T, B, n = x.shape
    folded = isinstance(x, TableLookup)
    # the rows of G are summed by group: one group (the bias's 1^T G), or one per id of the table (S^T G)
    groups = numpy.ascontiguousarray(x.ids, dtype=numpy.intp) if folded else numpy.zeros((T, B), numpy.intp)
    sums = numpy.zeros((x.rows if folded else 1, gates.shape[2]), numpy.float64)
    _backward_kernel(gates, c, tanh_c, doutput, dh, dc, dgates, _column_blocks(w_hh), groups, sums)
    G = dgates.reshape(T * B, -1)
    _weight_grad_kernel(G, h_prev.reshape(T * B, -1), dw_hh)  # Eq. (10): dW_hh += G^T H_{-1}
    if folded:
        x.backward(sums.astype(dw_ih.dtype), w_ih, dw_ih)  # Eqs. (4), (5) of mnn.layers.input_projection
        dx = None
    else:
        _weight_grad_kernel(G, numpy.ascontiguousarray(x).reshape(T * B, n), dw_ih)  # Eq. (10): dW_ih += G^T X
        dx = (G @ w_ih).reshape(T, B, n)  # Eq. (10)
    if db_ih is not None:
        dbias = sums.sum(axis=0)  # Eq. (10): 1^T G (Eq. 6 of mnn.layers.input_projection when folded)
        db_ih += dbias.astype(db_ih.dtype)
        db_hh += dbias.astype(db_hh.dtype)
    return dx


def tanh_float32(x):
    r"""The ``tanh`` of the compiled loops over a float32 array ``x``: a new array (the tests check it).

    Plain float32 arithmetic, without a library call, so that the compiler
    vectorises it. With $y = 2|x|$:

    $$
    \tanh |x| = \frac{e^y - 1}{e^y + 1} = \frac{E}{E + 2}, \qquad
    E = e^y - 1 = 2^k (e^r - 1) + (2^k - 1), \qquad
    k = \operatorname{round}(y / \ln 2), \quad r = y - k \ln 2 \in [-\tfrac{\ln 2}{2}, \tfrac{\ln 2}{2}]
    $$

    ($\ln 2$ in two parts, the first with few significant bits, so that
    $k \ln 2$ is subtracted exactly: Cody and Waite's reduction). $e^r - 1$ is
    its Taylor polynomial to $r^7$ (the remainder is under $10^{-8} |r|$),
    kept without its 1 so that nothing cancels when $k = 0$ (small $x$);
    $2^k$ is written into a float's exponent bits; $|x| \ge 9.5$, where
    $\tanh$ rounds to 1, is computed at 9.5. The sign goes back at the end;
    NaN stays NaN.

    Raises:
        RuntimeError: the compiled loops are not available (see :func:`can_run`).
    """
    if not can_run(x):
        raise RuntimeError("lstm_compiled.tanh_float32 needs numba, OpenBLAS's ILP64 sgemm and a float32 array")
    out = numpy.empty_like(x)
    _tanh_kernel(jit.flat(x), jit.flat(out))
    return out


@jit.kernel
def _tanh_kernel(x, out):
    for n in range(x.size):
        out[n] = _tanh(x[n])


@jit.kernel
def _forward_kernel(gates, bias, w_blocks, h, c, tanh_c):
    T, B, G = gates.shape
    H = G // 4
    blocks, K, width = w_blocks.shape
    for t in range(T):
        if bias.size:
            for b in range(B):
                a = gates[t, b]
                for j in range(G):
                    a[j] += bias[j]  # Eq. (1): the biases
        for k in range(blocks):  # gates[t] += h_{t-1} W_hh^T, block by block: Eq. (1)
            _sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, B, width, K, ONE, h[t].ctypes.data, K,
                   w_blocks[k].ctypes.data, width, ONE, gates[t, :, k * width:].ctypes.data, G)
        for b in range(B):  # three loops, on one slice a gate: the compiler vectorises them (not one loop of all)
            a, c_prev, c_new, tc, h_new = gates[t, b], c[t, b], c[t + 1, b], tanh_c[t, b], h[t + 1, b]
            i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
            for j in range(G):
                a[j] = _tanh(a[j])  # Eq. (2): tanh(a^g), and tanh(a/2) for the sigmoids
            for j in range(H):
                i[j] = HALF * (ONE + i[j])  # Eq. (2)
                f[j] = HALF * (ONE + f[j])  # Eq. (2)
                o[j] = HALF * (ONE + o[j])  # Eq. (2)
                c_new[j] = f[j] * c_prev[j] + i[j] * g[j]  # Eq. (3)
            for j in range(H):
                tc[j] = _tanh(c_new[j])  # Eq. (4)
                h_new[j] = o[j] * tc[j]  # Eq. (4)


@jit.kernel
def _backward_kernel(gates, c, tanh_c, doutput, dh, dc, dgates, w_blocks, groups, sums):
    T, B, G = gates.shape
    H = G // 4
    blocks, _, width = w_blocks.shape
    for t in range(T - 1, -1, -1):
        for b in range(B):
            a, da, c_prev, tcs, dout, dhb, dcb = gates[t, b], dgates[t, b], c[t, b], tanh_c[t, b], doutput[t, b], \
                dh[b], dc[b]
            i, f, g, o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
            di, df, dg, do = da[:H], da[H:2 * H], da[2 * H:3 * H], da[3 * H:]
            for j in range(H):
                tc = tcs[j]
                gh = dhb[j] + dout[j]  # g^h: the output's gradient plus what step t+1 carried
                dcv = dcb[j] + gh * o[j] * (ONE - tc * tc)  # Eq. (5)
                do[j] = gh * tc * o[j] * (ONE - o[j])  # Eq. (6)
                di[j] = dcv * g[j] * i[j] * (ONE - i[j])  # Eq. (7)
                df[j] = dcv * c_prev[j] * f[j] * (ONE - f[j])  # Eq. (7)
                dg[j] = dcv * i[j] * (ONE - g[j] * g[j])  # Eq. (7)
                dcb[j] = dcv * f[j]  # Eq. (8)
            group = sums[groups[t, b]]
            for j in range(G):
                group[j] += da[j]  # Eq. (10): 1^T G row by row, or S^T G (Eq. 3 of input_projection) per id
        for k in range(blocks):  # dh = dL/da_t W_hh, block by block: Eq. (9)
            _sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, B, width, G, ONE, dgates[t].ctypes.data, G,
                   w_blocks[k].ctypes.data, width, ZERO, dh[:, k * width:].ctypes.data, H)


@jit.kernel
def _weight_grad_kernel(dgates, x, dw):
    rows, G = dgates.shape
    n = x.shape[1]
    # dW += G^T X (dW_ih, dW_hh): Eq. (10), with beta = 1
    _sgemm(ROW_MAJOR, TRANS, NO_TRANS, G, n, rows, ONE, dgates.ctypes.data, G, x.ctypes.data, n, ONE,
           dw.ctypes.data, n)
