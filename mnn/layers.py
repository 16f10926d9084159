r"""The layers of the original mnn, each with its forward and backward derived by hand.

Every backward docstring goes the same way: the element-wise partial
derivatives, the Jacobian they form, and the vector-Jacobian product the code
computes, numbered with ``\tag{n}``; the code line that implements an equation
cites it as ``# Eq. (n)``. Shapes are batch-first: ``(B, ..., features)``.
"""

from __future__ import annotations

import math

import numpy

from mnn import jit
from mnn.backend import default_dtype, xp
from mnn.errors import InputError, ShapeError
from mnn.module import Module, check_input


class Linear(Module):
    r"""Affine map $y = x W^\top + b$, the weight stored ``(out_features, in_features)`` as in PyTorch.

    Forward, for one row $x \in \mathbb{R}^{n}$ of the input and $W \in \mathbb{R}^{m \times n}$:

    $$
    y_i = \sum_{j=1}^{n} W_{ij}\, x_j + b_i, \qquad i = 1, \dots, m. \tag{1}
    $$

    Any leading dimensions are flattened into one batch of $N$ rows, so the
    whole layer is one matrix product $Y = X W^\top + \mathbf{1} b^\top$.

    Backward. The partial derivatives of (1) are

    $$
    \frac{\partial y_i}{\partial x_j} = W_{ij}, \qquad
    \frac{\partial y_i}{\partial W_{kl}} = \delta_{ik}\, x_l, \qquad
    \frac{\partial y_i}{\partial b_k} = \delta_{ik},
    $$

    so the Jacobian with respect to the input is the weight itself,
    $J = \partial y / \partial x = W$. Given the upstream gradient
    $g = \partial L / \partial y$, the chain rule $\partial L/\partial x = J^\top g$
    collapses, for all $N$ rows at once, to three matrix products:

    $$
    \frac{\partial L}{\partial X} = G\, W \tag{2}
    $$

    $$
    \frac{\partial L}{\partial W} = G^\top X \tag{3}
    $$

    $$
    \frac{\partial L}{\partial b} = \sum_{r=1}^{N} G_{r,:} \tag{4}
    $$

    where $G \in \mathbb{R}^{N \times m}$ stacks the rows $g^\top$ and
    $X \in \mathbb{R}^{N \times n}$ the inputs. (3) and (4) sum over the batch:
    every row used the same $W$ and $b$. The code computes (4) as the product
    $\mathbf{1}^\top G$ with a vector of $N$ ones: a BLAS matrix-vector
    product, 2-4 times faster than numpy's column sum (measured on GPT shapes).

    A first layer fed with data needs no $\partial L / \partial X$: nothing
    upstream uses it. ``input_grad=False`` skips (2), a third of the layer's
    backward work (PyTorch's autograd skips it for inputs without
    ``requires_grad``), and ``backward`` returns ``None``.

    Args:
        in_features: $n$, the size of each input row.
        out_features: $m$, the size of each output row.
        bias: whether to add $b$.
        rng: a ``numpy.random.Generator`` for the initialisation.
        input_grad: whether ``backward`` computes and returns $\partial L / \partial X$.

    Parameters are initialised as in PyTorch: $U(-1/\sqrt{n}, 1/\sqrt{n})$.
    Cache: the input $X$ (needed by Eq. 3).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rng: numpy.random.Generator | None = None, dtype=None, input_grad: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_grad = bool(input_grad)
        rng = rng if rng is not None else numpy.random.default_rng()
        dtype = dtype or default_dtype()
        bound = 1.0 / math.sqrt(in_features)
        self.add_parameter("weight", xp.asarray(rng.uniform(-bound, bound, (out_features, in_features)), dtype=dtype))
        if bias:
            self.add_parameter("bias", xp.asarray(rng.uniform(-bound, bound, out_features), dtype=dtype))

    def forward(self, x):
        check_input(self, x, last_dim=self.in_features)
        self.cache = x
        y = x @ self.params["weight"].T  # Eq. (1)
        if "bias" in self.params:
            y += self.params["bias"]  # Eq. (1)
        return y

    def backward(self, dy):
        x = self.pop_cache()
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        self.grads["weight"] += dy2.T @ x2  # Eq. (3)
        if "bias" in self.params:
            self.grads["bias"] += xp.ones(dy2.shape[0], dtype=dy2.dtype) @ dy2  # Eq. (4): 1^T G
        if not self.input_grad:
            return None
        return dy @ self.params["weight"]  # Eq. (2)

    def extra_repr(self) -> str:
        skip = "" if self.input_grad else ", input_grad=False"
        return f"{self.in_features}, {self.out_features}, bias={'bias' in self.params}{skip}"


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
    over the input, and (2) is one pass too (numpy: two each).

    Cache: the boolean mask $\mathbb{1}[x > 0]$, one byte per element.
    """

    def forward(self, x):
        if jit.usable(x):
            y, mask = xp.empty(x.shape, dtype=x.dtype), xp.empty(x.shape, dtype=bool)
            _relu_kernel(jit.flat(x), jit.flat(y), jit.flat(mask))  # Eq. (1)
        else:
            mask = x > 0
            y = x * mask  # Eq. (1)
        self.cache = mask
        return y

    def backward(self, dy):
        mask = self.pop_cache()
        if jit.usable(dy, mask) and dy.shape == mask.shape:
            dx = xp.empty(dy.shape, dtype=dy.dtype)
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
        return dy / x  # Eq. (2)


class Softmax(Module):
    r"""Softmax over one axis (the last by default): positive outputs that sum to 1.

    Forward, for one row $x \in \mathbb{R}^n$ and any shift $c$ (the factor
    $e^{-c}$ cancels in the ratio):

    $$
    y_i = \frac{e^{x_i}}{\sum_{k=1}^{n} e^{x_k}} = \frac{e^{x_i - c}}{\sum_{k=1}^{n} e^{x_k - c}}. \tag{1}
    $$

    The shift is there for floating point. With the row maximum, $c = m =
    \max_k x_k$, no exponential overflows and the largest term is $e^0 = 1$,
    so the sum is at least 1 and never underflows: the textbook softmax, and
    the default. But any $c$ for which one term of the row is $e^0 = 1$ keeps
    the sum $\ge 1$, and a caller that knows such a value can pass it as
    ``shift``: attention passes each query's score against its own key, a
    position no causal mask drops, which saves the row maximum (a slow
    reduction in numpy along short rows: 182 µs on scores of shape
    ``(12, 4, 64, 64)``, against 20 µs for the row sums). Before the
    exponentials it checks, with one fast maximum over the whole array, that
    no $x_i - c$ reaches $\ln(\text{largest float}) - \ln n$ (about 84
    in float32 for $n = 64$), beyond which a row could overflow; if one does
    (or there is a NaN), it shifts by the row maximum after all.

    An optional additive ``mask`` $M$ (``0`` to keep, ``-inf`` to drop, e.g. a
    causal mask) gives $\operatorname{softmax}(x + M)$; a dropped position
    gets $e^{-\infty} = 0$. Adding a constant has Jacobian $I$, so the
    backward below is the same with or without it.

    Backward. Differentiating the quotient,

    $$
    \frac{\partial y_i}{\partial x_j}
    = \frac{\delta_{ij} e^{x_i} \sum_k e^{x_k} - e^{x_i} e^{x_j}}{\big(\sum_k e^{x_k}\big)^2}
    = y_i\,(\delta_{ij} - y_j),
    $$

    so the Jacobian is symmetric, with $y_i(1 - y_i)$ on the diagonal and
    $-y_i y_j$ off it:

    $$
    J = \operatorname{diag}(y) - y\, y^\top =
    \begin{pmatrix}
    y_1 (1 - y_1) & -y_1 y_2 & \cdots & -y_1 y_n \\
    -y_2 y_1 & y_2 (1 - y_2) & \cdots & -y_2 y_n \\
    \vdots & \vdots & \ddots & \vdots \\
    -y_n y_1 & -y_n y_2 & \cdots & y_n (1 - y_n)
    \end{pmatrix}.
    $$

    The vector-Jacobian product never needs $J$ itself:

    $$
    \frac{\partial L}{\partial x} = J^\top g = y \odot g - y\,(y^\top g)
    = y \odot \big(g - \langle g, y \rangle\big), \tag{2}
    $$

    one dot product per row and two element-wise operations: $O(n)$ per row
    instead of the $O(n^2)$ of a Jacobian. With numba (:mod:`mnn.jit`), when
    the softmax axis is the last, $x + M - c$ before the exponentials of (1)
    (with the overflow check) and all of (2) run as compiled loops over the
    rows, one pass each instead of three.

    Args:
        axis: the axis that sums to 1.

    Cache: the output $y$.
    """

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x, mask=None, shift=None, out=None):
        """``softmax(x + mask)`` along ``axis``.

        ``mask`` (optional) broadcasts against ``x``. ``shift`` (optional) is
        the $c$ of Eq. (1), one value per row (the softmax axis kept with size
        1) whose own term is in the row; by default the row maximum. ``out``
        (optional) receives the result and may be ``x`` itself.
        """
        if shift is not None:
            if self._compiled_shift(x, mask, shift, out):
                y = out if out is not None else xp.empty_like(x)
                if y is not x:
                    y[...] = x  # the loop works in place (reading and writing one array vectorises; two may alias)
                n = x.shape[-1]
                no_mask = y.reshape(-1, n)[:0]
                within = _shift_rows_kernel(y.reshape(-1, n), shift.reshape(-1), no_mask if mask is None else mask,
                                            self._largest_exponent(y))  # Eq. (1): x + M - c
            else:
                y = xp.subtract(x, shift, out=out)  # Eq. (1): x - c
                if mask is not None:
                    y += mask  # Eq. (1): x + M - c
                within = not (y.size and not y.max() < self._largest_exponent(y))
            if not within:  # a term would overflow, or a NaN:
                y -= y.max(axis=self.axis, keepdims=True)  # Eq. (1): shift by the row maximum after all
        elif mask is None:
            y = xp.subtract(x, x.max(axis=self.axis, keepdims=True), out=out)  # Eq. (1): c = m
        else:
            y = xp.add(x, mask, out=out)
            y -= y.max(axis=self.axis, keepdims=True)  # Eq. (1): c = m
        y = xp.exp(y, out=y)
        y /= self._row_sums(y)  # Eq. (1) (a compiled loop was measured slower here than einsum + divide)
        self.cache = y
        return y

    def _compiled(self, *arrays) -> bool:
        """Whether the compiled loops (mnn.jit) take these arrays: rows along the last axis, contiguous."""
        return self.axis in (-1, arrays[0].ndim - 1) and jit.usable(*arrays)

    def _compiled_shift(self, x, mask, shift, out) -> bool:
        """Whether the compiled ``x + M - c`` takes these: contiguous rows, one shift per row, and a mask
        that is absent or one ``(T, n)`` matrix for the last two axes (a causal mask)."""
        arrays = [x, shift] + ([] if out is None else [out]) + ([] if mask is None else [mask])
        if x.ndim < 2 or not self._compiled(*arrays) or shift.shape != x.shape[:-1] + (1,):
            return False
        return mask is None or mask.shape == x.shape[-2:]

    def _largest_exponent(self, a) -> float:
        """The largest exponent for which a whole row of $e^{z}$ still sums to a finite number."""
        return math.log(float(xp.finfo(a.dtype).max)) - math.log(a.shape[self.axis])

    def _row_sums(self, a):
        """Sums along the softmax axis, kept as a size-1 axis (einsum: faster than ``sum`` on short rows)."""
        if self.axis in (-1, a.ndim - 1):
            return xp.einsum("...i->...", a)[..., None]
        return a.sum(axis=self.axis, keepdims=True)

    def backward(self, dy):
        y = self.pop_cache()
        if self._compiled(y, dy):
            dx = xp.empty_like(dy)
            n = y.shape[-1]
            _softmax_backward_kernel(y.reshape(-1, n), dy.reshape(-1, n), dx.reshape(-1, n))  # Eq. (2)
            return dx
        dx = dy * y  # the one new array: first y * g, for the dot product
        inner = self._row_sums(dx)  # Eq. (2): <g, y>
        xp.subtract(dy, inner, out=dx)  # Eq. (2): g - <g, y>
        dx *= y  # Eq. (2)
        return dx

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


@jit.kernel
def _shift_rows_kernel(z, shift, mask, limit):
    """Softmax Eq. (1) before the exponentials: ``z <- z + M - c`` in place for rows ``(R, n)``, one pass.

    ``mask`` is ``(T, n)`` for the last two axes (row ``r`` takes mask row
    ``r mod T``) or empty. Returns False if some ``z`` is not below ``limit``
    (a row could overflow) or is NaN: the caller shifts by the row maximum then.
    """
    R, n = z.shape
    T = mask.shape[0]
    within = True
    for r in range(R):
        c = shift[r]
        for i in range(n):
            v = z[r, i] - c  # Eq. (1): x - c
            if T:
                v += mask[r % T, i]  # Eq. (1): + M
            z[r, i] = v
            if not v < limit:
                within = False
    return within


@jit.kernel(reassociate=True)
def _softmax_backward_kernel(y, dy, dx):
    """Softmax Eq. (2) row by row: ``dx = y (g - <g, y>)`` for rows ``(R, n)``."""
    R, n = y.shape
    for r in range(R):
        inner = y[r, 0] * 0
        for i in range(n):
            inner += dy[r, i] * y[r, i]  # Eq. (2): <g, y>
        for i in range(n):
            dx[r, i] = y[r, i] * (dy[r, i] - inner)  # Eq. (2)


class LogSoftmax(Module):
    r"""Logarithm of the softmax over one axis, computed stably in one step.

    Forward, with $m = \max_k x_k$:

    $$
    z_i = x_i - \log \sum_{k=1}^{n} e^{x_k}
        = x_i - m - \log \sum_{k=1}^{n} e^{x_k - m}. \tag{1}
    $$

    Backward. With $y = \operatorname{softmax}(x) = e^{z}$,

    $$
    \frac{\partial z_i}{\partial x_j} = \delta_{ij} - \frac{e^{x_j}}{\sum_k e^{x_k}} = \delta_{ij} - y_j,
    \qquad J = I - \mathbf{1}\, y^\top,
    $$

    so every row of $J$ is the same $-y^\top$ plus the identity, and

    $$
    \frac{\partial L}{\partial x} = J^\top g = g - y \sum_{i=1}^{n} g_i. \tag{2}
    $$

    Args:
        axis: the axis normalised over.

    Cache: the output $z$ ($y = e^{z}$ is recomputed in backward).
    """

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x):
        shifted = x - x.max(axis=self.axis, keepdims=True)
        z = shifted - xp.log(xp.exp(shifted).sum(axis=self.axis, keepdims=True))  # Eq. (1)
        self.cache = z
        return z

    def backward(self, dy):
        z = self.pop_cache()
        return dy - xp.exp(z) * dy.sum(axis=self.axis, keepdims=True)  # Eq. (2)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class Dropout(Module):
    r"""Inverted dropout: zero each element with probability $p$ while training, scale the rest by $1/(1-p)$.

    Forward, with a fresh mask $m_i \sim \operatorname{Bernoulli}(1 - p)$ per call:

    $$
    y_i = \frac{m_i\, x_i}{1 - p} \quad\text{(training)}, \qquad y = x \quad\text{(evaluation, or } p = 0\text{)}. \tag{1}
    $$

    The scale keeps $\mathbb{E}[y_i] = x_i$, so evaluation needs no rescaling.

    Backward. For a fixed mask the layer is linear and diagonal,
    $J = \operatorname{diag}\big(m / (1 - p)\big)$, so

    $$
    \frac{\partial L}{\partial x} = g \odot \frac{m}{1 - p}. \tag{2}
    $$

    Args:
        p: the drop probability, $0 \le p < 1$.
        rng: a ``numpy.random.Generator`` for the masks (seed it for reproducible runs).

    Cache: the scaled mask $m / (1 - p)$ (or nothing when the layer is the identity).
    """

    def __init__(self, p: float = 0.5, rng: numpy.random.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else numpy.random.default_rng()

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.cache = 1.0
            return x
        keep = self.rng.random(x.shape, dtype=numpy.float32) >= self.p
        scaled_mask = xp.asarray(keep, dtype=x.dtype) * (1.0 / (1.0 - self.p))
        self.cache = scaled_mask
        return x * scaled_mask  # Eq. (1)

    def backward(self, dy):
        scaled_mask = self.pop_cache()
        if isinstance(scaled_mask, float):
            return dy
        return dy * scaled_mask  # Eq. (2)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MatrixProduct(Module):
    r"""The product of two inputs, $D = Q P$, batched over any leading dimensions.

    This is the layer attention is built from: scores $Q K^\top$ and the
    weighted sum $A V$ are both matrix products of two *activations*, so the
    gradient must flow into both factors.

    Forward, for $Q \in \mathbb{R}^{n \times k}$ and $P \in \mathbb{R}^{k \times m}$
    (each leading index $(b, \dots)$ is an independent product):

    $$
    D_{ij} = \sum_{l=1}^{k} Q_{il}\, P_{lj}. \tag{1}
    $$

    For example, with $n = k = m = 2$:

    $$
    \begin{pmatrix} D_{11} & D_{12} \\ D_{21} & D_{22} \end{pmatrix}
    =
    \begin{pmatrix} Q_{11} & Q_{12} \\ Q_{21} & Q_{22} \end{pmatrix}
    \begin{pmatrix} P_{11} & P_{12} \\ P_{21} & P_{22} \end{pmatrix}
    =
    \begin{pmatrix}
    Q_{11} P_{11} + Q_{12} P_{21} & Q_{11} P_{12} + Q_{12} P_{22} \\
    Q_{21} P_{11} + Q_{22} P_{21} & Q_{21} P_{12} + Q_{22} P_{22}
    \end{pmatrix}.
    $$

    Backward. The element partials of (1) are

    $$
    \frac{\partial D_{ij}}{\partial Q_{ab}} = \delta_{ia}\, P_{bj}, \qquad
    \frac{\partial D_{ij}}{\partial P_{ab}} = Q_{ia}\, \delta_{bj}.
    $$

    Flattening matrices row by row ($\operatorname{vec}$), these are the
    Kronecker-structured Jacobians

    $$
    \frac{\partial \operatorname{vec} D}{\partial \operatorname{vec} Q} = I_n \otimes P^\top, \qquad
    \frac{\partial \operatorname{vec} D}{\partial \operatorname{vec} P} = Q \otimes I_m,
    $$

    of sizes $nm \times nk$ and $nm \times km$, never formed. Contracting the
    partials with the upstream gradient $G = \partial L / \partial D$ instead:

    $$
    \frac{\partial L}{\partial Q_{ab}} = \sum_{i,j} G_{ij}\, \delta_{ia} P_{bj} = \sum_j G_{aj} P_{bj}
    \quad\Longrightarrow\quad
    \frac{\partial L}{\partial Q} = G\, P^\top, \tag{2}
    $$

    $$
    \frac{\partial L}{\partial P_{ab}} = \sum_{i,j} G_{ij}\, Q_{ia} \delta_{bj} = \sum_i Q_{ia} G_{ib}
    \quad\Longrightarrow\quad
    \frac{\partial L}{\partial P} = Q^\top G. \tag{3}
    $$

    Shapes: ``Q (..., n, k)``, ``P (..., k, m)``, ``D (..., n, m)`` with the same
    leading dimensions on both inputs. ``backward(dD)`` returns ``(dQ, dP)``.
    Cache: both inputs (each is needed for the other's gradient).
    """

    def forward(self, q, p, out=None):
        if q.ndim < 2 or p.ndim < 2 or q.shape[:-2] != p.shape[:-2] or q.shape[-1] != p.shape[-2]:
            raise ShapeError(f"{self!r}: cannot multiply Q {tuple(q.shape)} by P {tuple(p.shape)}: "
                             "expected (..., n, k) and (..., k, m) with the same leading dims")
        self.cache = (q, p)
        return xp.matmul(q, p, out=out)  # Eq. (1)

    def backward(self, dd):
        q, p = self.pop_cache()
        dq = dd @ xp.swapaxes(p, -1, -2)  # Eq. (2)
        dp = xp.swapaxes(q, -1, -2) @ dd  # Eq. (3)
        return dq, dp
