r"""Softmax and LogSoftmax over the last axis: the first full Jacobian, applied without building it."""

from __future__ import annotations

import math

from mnn import jit
from mnn.backend import on_cpu, xp
from mnn.module import Module, check_output_grad


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
        """``softmax(x + mask)`` along ``axis``, kept for backward (:meth:`probabilities`' arguments)."""
        y = self.probabilities(x, mask, shift, out)
        self.cache = y
        return y

    def probabilities(self, x, mask=None, shift=None, out=None):
        """``softmax(x + mask)`` along ``axis`` (Eq. 1), keeping nothing: for callers that keep $y$ themselves
        (causal attention's row blocks) and pass it to :meth:`input_grad`.

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
                if on_cpu():
                    within = not (y.size and not y.max() < self._largest_exponent(y))
                else:
                    within = not y.size or self._shift_on_device(y)
            if not within:  # a term would overflow, or a NaN:
                y -= y.max(axis=self.axis, keepdims=True)  # Eq. (1): shift by the row maximum after all
        elif mask is None:
            y = xp.subtract(x, x.max(axis=self.axis, keepdims=True), out=out)  # Eq. (1): c = m
        else:
            y = xp.add(x, mask, out=out)
            y -= y.max(axis=self.axis, keepdims=True)  # Eq. (1): c = m
        y = xp.exp(y, out=y)
        y /= self._row_sums(y)  # Eq. (1) (a compiled loop was measured slower here than einsum + divide)
        return y

    def _shift_on_device(self, y) -> bool:
        """The overflow check without a read-back (GPU): the row maximum subtracted where it is due, 0 elsewhere.

        Subtracting 0 changes no value, so the result is the host path's bit for bit.
        """
        row_max = y.max(axis=self.axis, keepdims=True)
        y -= xp.where(y.max() < self._largest_exponent(y), 0, row_max)  # Eq. (1): c = m after all, or nothing
        return True

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
        check_output_grad(self, dy, y.shape)
        return self.input_grad(y, dy)

    def input_grad(self, y, dy):
        """Eq. (2) for the probabilities ``y`` :meth:`probabilities` returned and the upstream gradient ``dy``."""
        if self._compiled(y, dy):
            dx = xp.empty_like(dy)
            n = y.shape[-1]
            _softmax_backward_kernel(y.reshape(-1, n), dy.reshape(-1, n), dx.reshape(-1, n), dy.dtype.type(0))  # (2)
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
def _softmax_backward_kernel(y, dy, dx, zero):
    """Softmax Eq. (2) row by row: ``dx = y (g - <g, y>)`` for rows ``(R, n)``, the sums in ``zero``'s dtype (a
    literal 0 would make them float64, twice as slow: see LayerNorm's compiled forward)."""
    R, n = y.shape
    for r in range(R):
        inner = zero
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
        check_output_grad(self, dy, z.shape)
        return dy - xp.exp(z) * dy.sum(axis=self.axis, keepdims=True)  # Eq. (2)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
