r"""Element-wise activations: ReLU, LeakyReLU, Sigmoid, Tanh, Log, GELU, SiLU and ELU.

Each has a diagonal Jacobian, so its vector-Jacobian product is an
element-wise product with the local derivative; the docstrings derive it
element by element (``\tag{n}`` / ``# Eq. (n)``). ReLU and GELU have compiled
loops (:mod:`mnn.jit`) beside them, tested against the numpy path.
"""

from __future__ import annotations

import math

from mnn import cuda_kernels, jit
from mnn.backend import xp
from mnn.errors import InputError
from mnn.module import Module, check_output_grad, grad_enabled


class ReLU(Module):
    r"""Rectified linear unit, element-wise: $y = \max(x, 0)$.

    Forward:

    $$
    y_i = \max(x_i, 0). \tag{1}
    $$

    Backward. Each output depends only on its own input, so the Jacobian is
    diagonal:

    $$
    \frac{\partial y_i}{\partial x_j} = \delta_{ij}\, \mathbb{1}[x_i > 0], \qquad
    J = \operatorname{diag}\big(\mathbb{1}[x > 0]\big),
    $$

    and the vector-Jacobian product is a mask on the upstream gradient $g$:

    $$
    \frac{\partial L}{\partial x} = J^\top g = g \odot \mathbb{1}[x > 0]. \tag{2}
    $$

    (At $x_i = 0$ the derivative is taken as 0, as PyTorch does.) With numba
    (:mod:`mnn.jit`), (1) writes the mask and the output in one compiled pass
    over the input, and (2) is one pass too (numpy: two each), over any dense
    layout (:func:`mnn.jit.usable_any_layout`; e.g. Conv2d's channels-last output, kept).

    Cache: the boolean mask $\mathbb{1}[x > 0]$, one byte per element.
    """

    def forward(self, x):
        if jit.usable_any_layout(x):  # any dense layout: y and the mask keep x's (e.g. channels-last)
            y, mask = xp.empty_like(x), xp.empty_like(x, dtype=bool)
            _relu_kernel(jit.flat(x), jit.flat(y), jit.flat(mask))  # Eq. (1)
        else:
            mask = x > 0
            y = x * mask  # Eq. (1)
        self.cache = mask
        return y

    def backward(self, dy):
        mask = self.pop_cache()
        check_output_grad(self, dy, mask.shape)
        if jit.usable_any_layout(dy, mask):
            dx = xp.empty_like(dy)
            _relu_backward_kernel(jit.flat(dy), jit.flat(mask), jit.flat(dx))  # Eq. (2)
            return dx
        return dy * mask  # Eq. (2)


@jit.kernel
def _relu_kernel(x, y, mask):
    """ReLU Eq. (1) in one pass: the mask and ``y = x * mask`` (so NaN stays NaN and -x gives -0, as numpy's)."""
    for i in range(x.size):
        keep = x[i] > 0
        mask[i] = keep
        y[i] = x[i] * keep  # Eq. (1)


@jit.kernel
def _relu_backward_kernel(dy, mask, dx):
    """ReLU Eq. (2) in one pass: ``dx = g * mask``."""
    for i in range(dy.size):
        dx[i] = dy[i] * mask[i]  # Eq. (2)


class Sigmoid(Module):
    r"""Logistic sigmoid, element-wise: $y = 1 / (1 + e^{-x})$.

    Forward, computed as $\tfrac12(1 + \tanh(x/2))$, which is the same function
    and never overflows:

    $$
    y_i = \sigma(x_i) = \frac{1}{1 + e^{-x_i}} = \tfrac{1}{2}\big(1 + \tanh(x_i / 2)\big). \tag{1}
    $$

    Backward. $\sigma'(x) = \sigma(x)\,(1 - \sigma(x))$, so the Jacobian is
    diagonal, $J = \operatorname{diag}\big(y \odot (1 - y)\big)$, and

    $$
    \frac{\partial L}{\partial x} = g \odot y \odot (1 - y). \tag{2}
    $$

    Cache: the output $y$ (the derivative is a function of it alone).
    """

    def forward(self, x):
        y = 0.5 * (1.0 + xp.tanh(0.5 * x))  # Eq. (1)
        self.cache = y
        return y

    def backward(self, dy):
        y = self.pop_cache()
        check_output_grad(self, dy, y.shape)
        return dy * y * (1.0 - y)  # Eq. (2)


class Tanh(Module):
    r"""Hyperbolic tangent, element-wise: $y = \tanh(x)$.

    $$
    y_i = \tanh(x_i) = \frac{e^{x_i} - e^{-x_i}}{e^{x_i} + e^{-x_i}}. \tag{1}
    $$

    Backward. $\tanh'(x) = 1 - \tanh^2(x)$; the Jacobian is
    $J = \operatorname{diag}(1 - y \odot y)$ and

    $$
    \frac{\partial L}{\partial x} = g \odot (1 - y \odot y). \tag{2}
    $$

    Cache: the output $y$.
    """

    def forward(self, x):
        y = xp.tanh(x)  # Eq. (1)
        self.cache = y
        return y

    def backward(self, dy):
        y = self.pop_cache()
        check_output_grad(self, dy, y.shape)
        return dy * (1.0 - y * y)  # Eq. (2)


class Log(Module):
    r"""Natural logarithm, element-wise: $y = \ln x$, defined for $x > 0$.

    $$
    y_i = \ln x_i. \tag{1}
    $$

    Backward. $\partial y_i / \partial x_j = \delta_{ij} / x_i$, so
    $J = \operatorname{diag}(1/x)$ and

    $$
    \frac{\partial L}{\partial x} = g \oslash x \quad\text{(element-wise division)}. \tag{2}
    $$

    Cache: the input $x$. An input with a zero or negative entry is refused
    (its logarithm is $-\infty$ or NaN, which would poison training silently).
    """

    def forward(self, x):
        if not bool(xp.all(x > 0)):
            raise InputError(f"{self!r}: input must be positive; got min {float(xp.min(x))}")
        self.cache = x
        return xp.log(x)  # Eq. (1)

    def backward(self, dy):
        x = self.pop_cache()
        check_output_grad(self, dy, x.shape)
        return dy / x  # Eq. (2)


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

    With numba installed (:mod:`mnn.jit`), forward is three passes instead of
    eight (a compiled loop for $u$, numpy's vectorised ``tanh``, a compiled
    loop for $a$ and $y$) and backward one compiled loop for (2)-(3) instead
    of nine numpy passes.
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
        """Eq. (1) in three passes (compiled, numpy's ``tanh``, compiled) instead of eight."""
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


class LeakyReLU(Module):
    r"""ReLU with a small slope $\alpha$ for negative inputs, element-wise: $y = \max(x, 0) + \alpha \min(x, 0)$.

    $$
    y_i = \begin{cases} x_i & x_i > 0 \\ \alpha\, x_i & x_i \le 0 \end{cases} \tag{1}
    $$

    Backward. The Jacobian is diagonal,
    $\partial y_i / \partial x_j = \delta_{ij}\,(\mathbb{1}[x_i > 0] + \alpha\, \mathbb{1}[x_i \le 0])$, so

    $$
    \frac{\partial L}{\partial x} = g \odot s, \qquad s_i = \begin{cases} 1 & x_i > 0 \\ \alpha & x_i \le 0 \end{cases} \tag{2}
    $$

    (slope $\alpha$ at $x = 0$, as PyTorch). Cache: the boolean mask $\mathbb{1}[x > 0]$.

    Args:
        negative_slope: $\alpha$.
    """

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, x):
        mask = x > 0
        self.cache = mask
        return xp.where(mask, x, x * x.dtype.type(self.negative_slope))  # Eq. (1)

    def backward(self, dy):
        mask = self.pop_cache()
        check_output_grad(self, dy, mask.shape)
        return xp.where(mask, dy, dy * dy.dtype.type(self.negative_slope))  # Eq. (2)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class SiLU(Module):
    r"""Sigmoid-weighted linear unit (swish), element-wise: $y = x\, \sigma(x)$.

    $$
    y_i = x_i\, \sigma(x_i), \qquad \sigma(x) = \tfrac12\big(1 + \tanh(x/2)\big). \tag{1}
    $$

    Backward. Product rule with $\sigma' = \sigma(1 - \sigma)$; the Jacobian is diagonal and

    $$
    \frac{\partial L}{\partial x} = g \odot \big(\sigma(x) + x\, \sigma(x)(1 - \sigma(x))\big)
    = g \odot \sigma(x)\big(1 + x(1 - \sigma(x))\big). \tag{2}
    $$

    Cache: the input $x$ and $\sigma(x)$.
    """

    def forward(self, x):
        gate = 0.5 * (1.0 + xp.tanh(0.5 * x))  # Eq. (1): sigma(x), never overflows
        self.cache = (x, gate)
        return x * gate  # Eq. (1)

    def backward(self, dy):
        x, gate = self.pop_cache()
        check_output_grad(self, dy, x.shape)
        return dy * gate * (1.0 + x * (1.0 - gate))  # Eq. (2)


class ELU(Module):
    r"""Exponential linear unit, element-wise: $y = x$ for $x > 0$, $\alpha(e^x - 1)$ otherwise.

    $$
    y_i = \begin{cases} x_i & x_i > 0 \\ \alpha\,(e^{x_i} - 1) & x_i \le 0 \end{cases} \tag{1}
    $$

    Backward. The Jacobian is diagonal; for $x \le 0$ the derivative
    $\alpha e^{x}$ equals $y + \alpha$, so no exponential is recomputed:

    $$
    \frac{\partial L}{\partial x} = g \odot \begin{cases} 1 & x_i > 0 \\ y_i + \alpha & x_i \le 0 \end{cases} \tag{2}
    $$

    Cache: the output $y$ and the mask $\mathbb{1}[x > 0]$.

    Args:
        alpha: $\alpha$.
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x):
        mask = x > 0
        alpha = x.dtype.type(self.alpha)
        y = xp.where(mask, x, alpha * xp.expm1(xp.minimum(x, 0)))  # Eq. (1); min keeps exp from overflowing
        self.cache = (y, mask)
        return y

    def backward(self, dy):
        y, mask = self.pop_cache()
        check_output_grad(self, dy, y.shape)
        return xp.where(mask, dy, dy * (y + y.dtype.type(self.alpha)))  # Eq. (2)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
