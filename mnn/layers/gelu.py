r"""GELU, GPT-2's tanh form, with its compiled loops: a float32 forward in one pass, its ``tanh`` a rational function.

Split from :mod:`mnn.layers.activation` (the other element-wise activations)
because of its loops and the fitted ``tanh`` they use.
"""

from __future__ import annotations

import math

import numpy

from mnn import cuda_kernels, jit
from mnn.backend import xp
from mnn.module import Module, check_output_grad, grad_enabled

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


class GELU(Module):
    r"""Gaussian error linear unit in GPT-2's tanh form (PyTorch ``approximate='tanh'``), element-wise.

    Forward, with the gate $a$:

    $$
    u = \sqrt{2/\pi}\,\big(x + 0.044715\, x^3\big), \qquad
    a = \tfrac{1}{2}\big(1 + \tanh u\big), \qquad
    y = x\, a. \tag{1}
    $$

    Backward. Each output depends on its own input only, so the Jacobian is
    diagonal, $J = \operatorname{diag}(y'(x))$, with (product rule, and
    $\tanh' = 1 - \tanh^2$)

    $$
    y'(x) = \tfrac{1}{2}\big(1 + \tanh u\big)
    + \tfrac{1}{2}\, x\, \big(1 - \tanh^2 u\big)\, \sqrt{2/\pi}\,\big(1 + 3 \cdot 0.044715\, x^2\big).
    $$

    Since $\tanh u = 2a - 1$, $1 - \tanh^2 u = 4a(1 - a)$, and in terms of the gate

    $$
    y'(x) = a + 2 \sqrt{2/\pi}\; x \big(1 + 3 \cdot 0.044715\, x^2\big)\, a\, (1 - a). \tag{2}
    $$

    The vector-Jacobian product is one element-wise product:

    $$
    \frac{\partial L}{\partial x} = J^\top g = g \odot y'(x). \tag{3}
    $$

    Cache (none under :func:`mnn.no_grad`): the input $x$ and
    the gate $a$ (one extra array, which saves
    recomputing ``tanh``, the most expensive operation here, in backward; with
    $a$ rather than $\tanh u$, Eq. 2 takes three fewer passes than the tanh form).

    With numba installed (:mod:`mnn.jit`), backward is one compiled loop for
    (2)-(3) instead of nine numpy passes. Forward in float32 is one compiled
    loop that reads $x$ once and writes $a$ and $y$; numba has no vectorised
    ``tanh``, so the loop computes it as a rational function of $u$, fitted by
    ``tools/fit_tanh.py`` (Loeb's and Lawson's least-squares iterations for the
    smallest largest relative error):

    $$
    \tanh u \approx u\, \frac{P(s)}{Q(s)}, \quad s = (u / 9)^2, \quad \text{for } |u| < 9;
    \qquad \tanh u \approx \pm 1 \ \text{beyond}, \tag{4}
    $$

    $P$ of degree 6 and $Q$ of degree 3 (``_TANH_P``, ``_TANH_Q``); past
    $|u| = 9$, $\tanh u$ is within one float32 unit of $\pm 1$, so that
    $\operatorname{GELU}(\pm 20) = (20, -0)$ as in PyTorch. Evaluated in float32, (4) is
    within 6 units in the last place of $\tanh$ on $[-12, 12]$ (numpy's own
    float32 ``tanh``: 1.4), about $4 \cdot 10^{-7}$ relative. Measured on 2
    cores of an Intel Xeon (2026-12-01), inside a GPT CPU-recipe step, the
    forward took 0.63 ms over its four layers instead of 1.56 for three passes
    (a compiled loop for $u$, numpy's ``tanh``, a compiled loop for $a$ and
    $y$); that is how float64 still runs, where (4) would not be accurate enough.
    """

    def forward(self, x):
        if jit.usable(x):
            return self._forward_compiled(x)
        if cuda_kernels.usable(x):  # the GPU: Eq. (1) in one pass
            gate, y = cuda_kernels.gelu_forward(x, _SQRT_2_OVER_PI, _GELU_CUBIC * _SQRT_2_OVER_PI)
            self.cache = (x, gate)
            return y
        u = x * x
        u *= _GELU_CUBIC * _SQRT_2_OVER_PI
        u += _SQRT_2_OVER_PI
        u *= x  # Eq. (1): u = sqrt(2/pi) x (1 + 0.044715 x^2)
        gate = xp.tanh(u, out=u)
        gate += 1.0
        gate *= 0.5  # Eq. (1): a = (1 + tanh u) / 2
        if not grad_enabled():  # nothing to keep for a backward: the output takes the gate's memory
            gate *= x  # Eq. (1)
            return gate
        self.cache = (x, gate)
        return x * gate  # Eq. (1)

    def backward(self, dy):
        x, gate = self.pop_cache()
        check_output_grad(self, dy, x.shape)
        if jit.usable(x, gate, dy):
            dx = xp.empty_like(dy)
            real = x.dtype.type
            _gelu_backward_kernel(jit.flat(x), jit.flat(gate), jit.flat(dy), jit.flat(dx), real(1.0),
                                  real(2.0 * _SQRT_2_OVER_PI), real(6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI))
            return dx
        if cuda_kernels.usable(x, gate, dy):  # the GPU: Eqs. (2)-(3) in one pass
            return cuda_kernels.gelu_backward(x, gate, dy, 2.0 * _SQRT_2_OVER_PI, 6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI)
        slope = x * x
        slope *= 6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI
        slope += 2.0 * _SQRT_2_OVER_PI
        slope *= x  # Eq. (2): 2 sqrt(2/pi) x (1 + 3c x^2)
        slope *= gate
        slope *= 1.0 - gate  # Eq. (2): times a (1 - a)
        slope += gate  # Eq. (2)
        slope *= dy  # Eq. (3)
        return slope

    def _forward_compiled(self, x):
        """Eq. (1): float32 in one compiled pass with Eq. (4) for ``tanh``; float64 in three passes (compiled,
        numpy's ``tanh``, compiled) instead of eight."""
        if x.dtype == numpy.float32:
            gate, y = xp.empty_like(x), xp.empty_like(x)
            _gelu_float32_kernel(jit.flat(x), jit.flat(gate), jit.flat(y))
            self.cache = (x, gate)  # kept only if grad is enabled (Module.cache)
            return y
        real = x.dtype.type
        u = xp.empty_like(x)
        _gelu_argument_kernel(jit.flat(x), jit.flat(u), real(_SQRT_2_OVER_PI), real(_GELU_CUBIC * _SQRT_2_OVER_PI))
        gate = xp.tanh(u, out=u)  # Eq. (1): tanh u
        if not grad_enabled():  # nothing to keep for a backward: the output takes the gate's memory
            _gelu_output_kernel(jit.flat(x), jit.flat(gate), real(0.5))
            return gate
        y = xp.empty_like(x)
        _gelu_gate_kernel(jit.flat(x), jit.flat(gate), jit.flat(y), real(0.5))
        self.cache = (x, gate)
        return y


# Eq. (4)'s coefficients, lowest degree first, as printed by tools/fit_tanh.py.
_TANH_LIMIT = 9.0
_TANH_P = (1.0, 10.598048210144043, 20.36505889892578, 5.9278564453125, -0.8706285357475281, 0.18402983248233795,
           -0.023974377661943436)
_TANH_Q = (1.0, 37.598045349121094, 160.71287536621094, 135.31260681152344)
_P0, _P1, _P2, _P3, _P4, _P5, _P6 = (numpy.float32(c) for c in _TANH_P)  # float32 constants inside the loop
_Q0, _Q1, _Q2, _Q3 = (numpy.float32(c) for c in _TANH_Q)
_S, _SC = numpy.float32(_SQRT_2_OVER_PI), numpy.float32(_GELU_CUBIC * _SQRT_2_OVER_PI)
_LIMIT, _INV_LIMIT2 = numpy.float32(_TANH_LIMIT), numpy.float32(1.0 / _TANH_LIMIT**2)
_ONE, _HALF = numpy.float32(1.0), numpy.float32(0.5)


@jit.kernel(fused_multiply_add=True)
def _gelu_float32_kernel(x, gate, y):
    """GELU Eq. (1) in float32 in one pass, ``tanh u`` by Eq. (4): writes the gate ``a`` and ``y``."""
    for i in range(x.size):
        xi = x[i]
        u = (xi * xi * _SC + _S) * xi  # Eq. (1)
        s = u * u * _INV_LIMIT2  # Eq. (4)
        p = ((((((_P6 * s + _P5) * s + _P4) * s + _P3) * s + _P2) * s + _P1) * s + _P0) * u  # Eq. (4): u P(s)
        t = p / (((_Q3 * s + _Q2) * s + _Q1) * s + _Q0)  # Eq. (4): tanh u for |u| < 9 (inf/inf past it: unused)
        t = _ONE if u >= _LIMIT else (-_ONE if u <= -_LIMIT else t)  # Eq. (4): +-1 beyond
        a = t * _HALF + _HALF  # Eq. (1): a = (1 + tanh u) / 2
        gate[i] = a
        y[i] = xi * a  # Eq. (1)


@jit.kernel
def _gelu_argument_kernel(x, u, s, sc):
    """GELU Eq. (1): ``u = sqrt(2/pi) (x + 0.044715 x^3)`` as ``(x^2 (0.044715 s) + s) x``, ``s`` = sqrt(2/pi)."""
    for i in range(x.size):
        xi = x[i]
        u[i] = (xi * xi * sc + s) * xi  # Eq. (1)


@jit.kernel
def _gelu_gate_kernel(x, gate, y, half):
    """GELU Eq. (1): ``gate`` holds ``tanh u`` on entry and the gate ``a`` on return; ``y = x a``."""
    for i in range(x.size):
        a = gate[i] * half + half  # Eq. (1): a = (1 + tanh u) / 2
        gate[i] = a
        y[i] = x[i] * a  # Eq. (1)


@jit.kernel
def _gelu_output_kernel(x, gate, half):
    """GELU Eq. (1) under no_grad: ``gate`` holds ``tanh u`` on entry and ``y = x a`` on return."""
    for i in range(x.size):
        gate[i] = x[i] * (gate[i] * half + half)  # Eq. (1)


@jit.kernel
def _gelu_backward_kernel(x, gate, dy, dx, one, s2, s6c):
    """GELU Eqs. (2)-(3): ``dx = dy (a + 2 s x (1 + 3c x^2) a (1 - a))``, ``s2`` = 2s, ``s6c`` = 6cs."""
    for i in range(x.size):
        xi = x[i]
        a = gate[i]
        slope = (xi * xi * s6c + s2) * xi * a * (one - a) + a  # Eq. (2)
        dx[i] = slope * dy[i]  # Eq. (3)
