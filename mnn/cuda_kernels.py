r"""Fused element-wise kernels for the GPU (CuPy), the counterpart of the compiled CPU loops of :mod:`mnn.jit`.

On the CPU, numba fuses the passes of GELU, LayerNorm, the cross-entropy and
the AdamW update into single loops (:mod:`mnn.jit`); numba does not run on a
GPU. There, each numpy-style expression of the reference path is one CUDA
kernel launch and one pass over memory; these kernels compute the same
numbered equations in one pass each, written with CuPy's
``ElementwiseKernel`` and ``ReductionKernel`` (compiled by NVRTC on first use
and cached by CuPy). A layer takes them only when :func:`usable` says so: the
active device is ``"gpu"``, ``MNN_CUDA_KERNELS`` is not ``0``, and the arrays
are float32 or float64; otherwise its ``xp`` path runs, which stays the
reference (``tests/test_gpu.py`` compares every layer on the device with the
CPU). This module imports CuPy only when a kernel is first built, so importing
it on a machine without CuPy costs nothing.

Each kernel cites the equation of its layer's docstring it implements:
GELU (:class:`~mnn.layers.GELU`, Eqs. 1-3), LayerNorm
(:class:`~mnn.layers.LayerNorm`, Eqs. 1-3), the cross-entropy
(:class:`~mnn.losses.CrossEntropyLoss`, Eqs. 1-2) and Adam/AdamW
(:class:`~mnn.optim.Adam`, Eqs. 1-6).
"""

from __future__ import annotations

import functools
import os

from mnn import backend

_FLOATS = frozenset("fd")  # float32, float64


def usable(*arrays) -> bool:
    """Whether the fused kernels take these arrays: device ``"gpu"``, ``MNN_CUDA_KERNELS`` not ``0``, float32/64."""
    return (backend.device == "gpu" and os.environ.get("MNN_CUDA_KERNELS", "1") != "0"
            and all(array.dtype.char in _FLOATS for array in arrays))


@functools.cache
def _kernels():
    """Build the kernels once (CuPy compiles each on its first launch per dtype)."""
    import cupy  # noqa: PLC0415 - only on a GPU

    kernels = {
        # GELU Eq. (1): u = (x^2 c s + s) x, a = (1 + tanh u) / 2, y = x a
        "gelu_forward": cupy.ElementwiseKernel(
            "T x, T s, T sc", "T gate, T y",
            "T u = (x * x * sc + s) * x; gate = (tanh(u) + (T)1) * (T)0.5; y = x * gate;",
            "mnn_gelu_forward"),
        # GELU Eqs. (2)-(3): dx = dy (a + 2 s x (1 + 3 c x^2) a (1 - a))
        "gelu_backward": cupy.ElementwiseKernel(
            "T x, T gate, T dy, T s2, T s6c", "T dx",
            "T slope = (x * x * s6c + s2) * x; dx = dy * (gate + slope * gate * ((T)1 - gate));",
            "mnn_gelu_backward"),
        # LayerNorm Eq. (1): the variance (1/C) sum_c (x_c - mu)^2, mu broadcast along the row
        "row_squares": cupy.ReductionKernel(
            "T x, T mu", "T squares", "(x - mu) * (x - mu)", "a + b", "squares = a", "0", "mnn_row_squares"),
        # LayerNorm Eqs. (1)-(2): x_hat = (x - mu) r, y = gamma x_hat + beta
        "layernorm_normalize": cupy.ElementwiseKernel(
            "T x, T mu, T rstd, T weight, T bias", "T x_hat, T y",
            "x_hat = (x - mu) * rstd; y = x_hat * weight + bias;",
            "mnn_layernorm_normalize"),
        # LayerNorm Eq. (3): dx = r (gamma g - mean(gamma g) - x_hat mean(gamma g x_hat))
        "layernorm_input_grad": cupy.ElementwiseKernel(
            "T dy, T weight, T x_hat, T mean_g, T projection, T rstd", "T dx",
            "dx = (dy * weight - mean_g - x_hat * projection) * rstd;",
            "mnn_layernorm_input_grad"),
        # cross-entropy Eq. (1): e = exp(x - m), m the row maximum
        "exp_shifted": cupy.ElementwiseKernel("T x, T m", "T e", "e = exp(x - m);", "mnn_exp_shifted"),
        # cross-entropy Eq. (2): (y - onehot(t)) / N * dloss, row i / C, column i % C
        "onehot_subtract": cupy.ElementwiseKernel(
            "raw S labels, int64 C, T scale", "T probs",
            "probs = (probs - (i % C == labels[i / C] ? (T)1 : (T)0)) * scale;",
            "mnn_onehot_subtract"),
        # Adam Eqs. (1)-(6), AdamW's shrink (its Eq. 1) as a factor (1 for Adam)
        "adam_update": cupy.ElementwiseKernel(
            "T grad, T shrink, T l2, T beta1, T beta2, T one_minus_beta2, T eps, T step_size, T bias2_sqrt",
            "T param, T m, T v",
            """
            T p = param;
            T g = grad;
            if (l2 != (T)0) g = g + l2 * p;
            p = p * shrink;
            T mi = beta1 * (m - g) + g;
            T vi = beta2 * v + one_minus_beta2 * (g * g);
            m = mi;
            v = vi;
            param = p - mi / (sqrt(vi) / bias2_sqrt + eps) * step_size;
            """,
            "mnn_adam_update"),
    }
    return kernels


def gelu_forward(x, s: float, sc: float):
    r"""GELU Eq. (1) in one pass: returns ``(gate, y)``, the gate $a$ kept for backward."""
    real = x.dtype.type
    return _kernels()["gelu_forward"](x, real(s), real(sc))


def gelu_backward(x, gate, dy, s2: float, s6c: float):
    """GELU Eqs. (2)-(3) in one pass: ``dx``."""
    real = x.dtype.type
    return _kernels()["gelu_backward"](x, gate, dy, real(s2), real(s6c))


def layernorm_forward(x, weight, bias, eps: float):
    """LayerNorm Eqs. (1)-(2): ``(x_hat, rstd, y)``; two row reductions and one element-wise pass."""
    xp = backend.xp
    real = x.dtype.type
    C = x.shape[-1]
    mu = x.mean(axis=-1, keepdims=True)  # Eq. (1)
    variance = _kernels()["row_squares"](x, mu, axis=-1, keepdims=True) * real(1.0 / C)  # Eq. (1)
    rstd = 1.0 / xp.sqrt(variance + real(eps))  # Eq. (1): r
    x_hat, y = _kernels()["layernorm_normalize"](x, mu, rstd, weight, bias if bias is not None else real(0))
    return x_hat, rstd, y


def layernorm_input_grad(dy, weight, x_hat, rstd):
    """LayerNorm Eq. (3): ``dx`` from the two row means and one element-wise pass."""
    xp = backend.xp
    inv_C = dy.dtype.type(1.0 / dy.shape[-1])
    mean_g = xp.einsum("...c,c->...", dy, weight)[..., None] * inv_C  # Eq. (3): mean of gamma g
    projection = xp.einsum("...c,c,...c->...", dy, weight, x_hat)[..., None] * inv_C  # Eq. (3)
    return _kernels()["layernorm_input_grad"](dy, weight, x_hat, mean_g, projection, rstd)


def exp_shifted(rows, row_max):
    """Cross-entropy Eq. (1): ``exp(x - m)`` in one pass."""
    return _kernels()["exp_shifted"](rows, row_max)


def onehot_subtract(probs, labels, scale: float) -> None:
    """Cross-entropy Eq. (2) in place on ``probs`` ``(N, C)``: ``(y - onehot(t)) * scale``."""
    import numpy  # noqa: PLC0415

    _kernels()["onehot_subtract"](labels, numpy.int64(probs.shape[1]), probs.dtype.type(scale), probs)


def adam_update(param, grad, m, v, shrink, l2, beta1, beta2, eps, step_size, bias2_sqrt) -> None:
    r"""Adam's Eqs. (1)-(6) (AdamW: ``shrink`` $= 1 - \eta\lambda$) in one pass, in place on param, m, v."""
    real = param.dtype.type
    _kernels()["adam_update"](grad, real(shrink), real(l2), real(beta1), real(beta2), real(1.0 - beta2), real(eps),
                              real(step_size), real(bias2_sqrt), param, m, v)
