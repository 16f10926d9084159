r"""Element-wise activations: ReLU, LeakyReLU, Sigmoid, Tanh, Log, SiLU and ELU (GELU: :mod:`mnn.layers.gelu`).

Each has a diagonal Jacobian, so its vector-Jacobian product is an
element-wise product with the local derivative; the docstrings derive it
element by element (``\tag{n}`` / ``# Eq. (n)``). ReLU has compiled
loops (:mod:`mnn.jit`) beside it, tested against the numpy path.
"""

from __future__ import annotations

from mnn import jit
from mnn.backend import xp
from mnn.errors import InputError
from mnn.module import Module, check_output_grad


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
