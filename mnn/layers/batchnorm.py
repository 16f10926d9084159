r"""BatchNorm1d and BatchNorm2d: normalisation over the batch, with running statistics kept as buffers."""

from __future__ import annotations

import numpy

from mnn import jit
from mnn.backend import default_dtype, xp
from mnn.errors import ShapeError
from mnn.module import Module, check_output_grad


class _BatchNorm(Module):
    """Shared by BatchNorm1d and BatchNorm2d; the derivation is in :class:`BatchNorm2d`."""

    _ndims: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype=None) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        dtype = dtype or default_dtype()
        if affine:
            self.add_parameter("weight", xp.ones(num_features, dtype=dtype))
            self.add_parameter("bias", xp.zeros(num_features, dtype=dtype))
        if track_running_stats:
            self.add_buffer("running_mean", xp.zeros(num_features, dtype=dtype))
            self.add_buffer("running_var", xp.ones(num_features, dtype=dtype))
            self.add_buffer("num_batches_tracked", xp.zeros((), dtype=xp.int64))

    def _rows(self, x):
        """The ``(m, C)`` matrix of each channel's values: a view when ``x`` is channels-last."""
        if x.ndim not in self._ndims:
            raise ShapeError(f"{self!r}: expected a {' or '.join(f'{n}-D' for n in self._ndims)} input "
                             f"(N, {self.num_features}{', ...' if max(self._ndims) > 2 else ''}), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{self!r}: expected {self.num_features} channels in dim 1, got shape {tuple(x.shape)}")
        return xp.moveaxis(x, 1, -1).reshape(-1, self.num_features)

    def _unrows(self, rows, shape):
        """``(m, C)`` back to the input's shape (channels-last memory for 3-D and 4-D)."""
        moved = (shape[0], *shape[2:], shape[1])
        return xp.moveaxis(rows.reshape(moved), -1, 1)

    def forward(self, x):
        rows = self._rows(x)
        m = rows.shape[0]
        use_batch = self.training or not self.track_running_stats
        real = x.dtype.type
        compiled = jit.usable(rows)
        if use_batch:
            if m < 2 and self.training:
                raise ShapeError(f"{self!r}: expected more than 1 value per channel when training, got shape "
                                 f"{tuple(x.shape)}")
            if compiled:  # one pass: both sums of Eq. (1)
                mean, variance = xp.empty(rows.shape[1]), xp.empty(rows.shape[1])
                _moments_kernel(rows, mean, variance)
                mean, variance = mean.astype(x.dtype), variance.astype(x.dtype)
            else:
                ones = xp.ones(m, dtype=x.dtype)
                mean = (ones @ rows) * real(1.0 / m)  # Eq. (1)
                centred = rows - mean  # x - mu
                variance = (ones @ (centred * centred)) * real(1.0 / m)  # Eq. (1), biased
            rstd = 1.0 / xp.sqrt(variance + real(self.eps))  # Eq. (1)
            if self.training and self.track_running_stats:
                self._update_running(mean, variance, m)
        else:
            mean = self.buffers["running_mean"].astype(x.dtype)
            rstd = 1.0 / xp.sqrt(self.buffers["running_var"].astype(x.dtype) + real(self.eps))
            centred = None
        scale = rstd * self.params["weight"].astype(x.dtype, copy=False) if self.affine else rstd  # gamma r
        shift = self.params["bias"].astype(x.dtype, copy=False) if self.affine else xp.zeros_like(rstd)  # beta
        if compiled:
            y = xp.empty_like(rows)
            _affine_kernel(rows, mean, scale, shift, y)  # Eq. (2): (x - mu) gamma r + beta, one pass
        else:
            y = rows - mean if centred is None else centred
            y *= scale  # Eq. (2): (x - mu) gamma r
            y += shift  # Eq. (2): + beta
        self.cache = (rows, mean, rstd, scale, x.shape, use_batch)
        return self._unrows(y, x.shape)

    def _update_running(self, mean, variance, m: int) -> None:
        """Eq. (3), in place (the state dict and any DataParallel replica hold these arrays)."""
        count = self.buffers["num_batches_tracked"]
        count += 1
        rho = 1.0 / float(count) if self.momentum is None else float(self.momentum)
        running_mean, running_var = self.buffers["running_mean"], self.buffers["running_var"]
        running_mean *= 1.0 - rho
        running_mean += (rho * mean).astype(running_mean.dtype)  # Eq. (3)
        running_var *= 1.0 - rho
        running_var += (rho * m / (m - 1) * variance).astype(running_var.dtype)  # Eq. (3): unbiased

    def backward(self, dy):
        rows, mean, rstd, scale, shape, batch_stats = self.pop_cache()
        check_output_grad(self, dy, shape)
        g = self._rows(dy)
        m = g.shape[0]
        compiled = jit.usable(g, rows)
        if compiled:  # one pass: both sums of Eq. (6)
            sum_g, sum_g_centred = xp.empty(g.shape[1]), xp.empty(g.shape[1])
            _gradient_sums_kernel(g, rows, mean, sum_g, sum_g_centred)
            sum_g, sum_g_centred = sum_g.astype(dy.dtype), sum_g_centred.astype(dy.dtype)
        else:
            ones = xp.ones(m, dtype=dy.dtype)
            sum_g = ones @ g  # Eq. (6): dL/dbeta
            sum_g_centred = ones @ (g * (rows - mean))  # sum g (x - mu)
        sum_g_x_hat = sum_g_centred * rstd  # Eq. (6): dL/dgamma = r sum g (x - mu)
        if self.affine:
            self.grads["weight"] += sum_g_x_hat  # Eq. (6)
            self.grads["bias"] += sum_g  # Eq. (6)
        if not batch_stats:  # evaluation with running statistics: a diagonal Jacobian
            return self._unrows(g * scale, shape)  # Eq. (6)
        real = dy.dtype.type
        slope = -scale * rstd * sum_g_x_hat * real(1.0 / m)  # Eq. (7): - gamma r^2 sum(g x_hat) / m
        offset = -scale * sum_g * real(1.0 / m)  # Eq. (7): - gamma r sum(g) / m
        if compiled:
            dx = xp.empty_like(g)
            _input_gradient_kernel(g, rows, mean, scale, slope, offset, dx)  # Eq. (7), one pass
        else:
            dx = rows - mean
            dx *= slope  # Eq. (7)
            dx += g * scale  # Eq. (7)
            dx += offset  # Eq. (7)
        return self._unrows(dx, shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


@jit.kernel
def _moments_kernel(rows, mean, variance):
    r"""Eq. (1) in one pass over ``rows`` ``(m, C)``: each column's mean and biased variance, summed in float64.

    The sums are of the deviations from the first row ($d = x - x_1$; then
    $\mu = x_1 + \bar d$, $\sigma^2 = \overline{d^2} - \bar d^2$), which
    keeps the one-pass variance exact to rounding when the mean is large against the spread.
    """
    m, C = rows.shape
    first = numpy.empty(C)
    total, squares = numpy.zeros(C), numpy.zeros(C)
    for c in range(C):
        first[c] = rows[0, c]
    for k in range(m):
        for c in range(C):
            d = rows[k, c] - first[c]
            total[c] += d
            squares[c] += d * d
    for c in range(C):
        average = total[c] / m
        mean[c] = first[c] + average  # Eq. (1)
        variance[c] = max(squares[c] / m - average * average, 0.0)  # Eq. (1)


@jit.kernel
def _affine_kernel(rows, mean, scale, shift, y):
    """Eq. (2) in one pass: ``y = (x - mu) * gamma r + beta`` for every row."""
    m, C = rows.shape
    for k in range(m):
        for c in range(C):
            y[k, c] = (rows[k, c] - mean[c]) * scale[c] + shift[c]  # Eq. (2)


@jit.kernel
def _gradient_sums_kernel(g, rows, mean, sum_g, sum_g_centred):
    r"""The sums of Eq. (6) in one pass, in float64: $\sum_k g_k$ and $\sum_k g_k (x_k - \mu)$ per column."""
    m, C = g.shape
    sum_g[:] = 0.0
    sum_g_centred[:] = 0.0
    for k in range(m):
        for c in range(C):
            sum_g[c] += g[k, c]
            sum_g_centred[c] += g[k, c] * (rows[k, c] - mean[c])


@jit.kernel
def _input_gradient_kernel(g, rows, mean, scale, slope, offset, dx):
    """Eq. (7) in one pass: ``dx = gamma r g + slope (x - mu) + offset``, the coefficients per column."""
    m, C = g.shape
    for k in range(m):
        for c in range(C):
            dx[k, c] = g[k, c] * scale[c] + (rows[k, c] - mean[c]) * slope[c] + offset[c]  # Eq. (7)


class BatchNorm1d(_BatchNorm):
    r"""Batch normalisation of ``(N, C)`` or ``(N, C, L)`` inputs over $N$ (and $L$), as ``torch.nn.BatchNorm1d``.

    The same equations as :class:`BatchNorm2d` (forward, running statistics,
    the full and the compact backward), with the $m = N$ or $NL$ values of each channel.
    """

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    r"""Batch normalisation of ``(N, C, H, W)`` inputs over $N, H, W$, as ``torch.nn.BatchNorm2d``: $y = \gamma \hat x + \beta$.

    Forward in training, for one channel with its $m$ values $x_1, \dots, x_m$
    (the batch, times the positions $H W$ or $L$):

    $$
    \mu = \frac{1}{m} \sum_{k} x_k, \qquad
    \sigma^2 = \frac{1}{m} \sum_{k} (x_k - \mu)^2, \qquad
    r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \tag{1}
    $$

    $$
    \hat x_k = (x_k - \mu)\, r, \qquad y_k = \gamma\, \hat x_k + \beta. \tag{2}
    $$

    $\sigma^2$ is the biased variance; the running statistics, updated in
    place with momentum $\rho$ (PyTorch's convention: the weight of the *new*
    value), use the unbiased one, as PyTorch does:

    $$
    \bar\mu \leftarrow (1 - \rho)\,\bar\mu + \rho\,\mu, \qquad
    \bar\sigma^2 \leftarrow (1 - \rho)\,\bar\sigma^2 + \rho\, \frac{m}{m-1}\,\sigma^2. \tag{3}
    $$

    (``momentum=None``: $\rho = 1/t$ at the $t$-th batch, a cumulative
    average; ``num_batches_tracked`` counts $t$.) In evaluation with running
    statistics, (1) is replaced by the buffers, $\mu = \bar\mu$,
    $r = (\bar\sigma^2 + \epsilon)^{-1/2}$: then $y$ is an affine function of
    $x$ and the backward is the diagonal $\partial L / \partial x = \gamma\, r\, g$ (6).

    Backward in training, the full form. $x_k$ reaches $L$ through $\hat x_k$
    directly and through $\mu$ and $\sigma^2$ (with $\hat g_k = \gamma g_k$,
    $\partial L / \partial \hat x_k$):

    $$
    \frac{\partial L}{\partial \sigma^2} = \sum_k \hat g_k (x_k - \mu) \Big(-\tfrac12\Big) r^3, \qquad
    \frac{\partial L}{\partial \mu} = \sum_k \hat g_k (-r)
    + \frac{\partial L}{\partial \sigma^2} \cdot \frac{-2}{m} \sum_k (x_k - \mu),
    $$

    $$
    \frac{\partial L}{\partial x_k} = \hat g_k\, r + \frac{\partial L}{\partial \sigma^2} \frac{2 (x_k - \mu)}{m}
    + \frac{\partial L}{\partial \mu} \frac{1}{m}. \tag{4}
    $$

    The term through the mean that many write-ups call "missing" is the
    second one in $\partial L / \partial \mu$ ($\sigma^2$ depends on $\mu$):
    it is **zero**, because $\sum_k (x_k - \mu) = m\mu - m\mu = 0$. Leaving it
    out is exact, not an approximation. Substituting
    $x_k - \mu = \hat x_k / r$ into (4):

    $$
    \frac{\partial L}{\partial x_k} = \frac{r}{m}\Big(m\, \hat g_k - \sum_j \hat g_j
    - \hat x_k \sum_j \hat g_j \hat x_j\Big), \tag{5}
    $$

    the compact form the code computes: two channel sums and element-wise
    work. It is the symmetric Jacobian

    $$
    \frac{\partial \hat x}{\partial x} = \frac{r}{m}\left(m I - \mathbf{1}\mathbf{1}^\top - \hat x \hat x^\top\right)
    $$

    applied to $\hat g$, LayerNorm's Jacobian with the batch in place of the features. Consequence: with
    $\beta = 0$ the sum $\sum_k y_k = \gamma \sum_k \hat x_k = 0$ for every
    $x$, so a check of ``y.sum()`` proves nothing; the tests use random
    upstream gradients and random $\gamma, \beta$. The parameters are
    shared by all $m$ values:

    $$
    \frac{\partial L}{\partial \gamma} = \sum_k g_k \hat x_k, \qquad
    \frac{\partial L}{\partial \beta} = \sum_k g_k, \qquad
    \Big(\text{evaluation: } \frac{\partial L}{\partial x_k} = \gamma\, r\, g_k\Big). \tag{6}
    $$

    The code computes (5) with $\hat x_k = (x_k - \mu) r$ expanded, as one
    affine map per channel of $g_k$ and $x_k - \mu$ (coefficients from the
    two sums of (6), computed once per channel):

    $$
    \frac{\partial L}{\partial x_k} = \gamma r\, g_k
    + \underbrace{\Big(-\frac{\gamma r^2}{m} \sum_j g_j \hat x_j\Big)}_{\text{slope}} (x_k - \mu)
    + \underbrace{\Big(-\frac{\gamma r}{m} \sum_j g_j\Big)}_{\text{offset}}, \qquad
    \sum_j g_j \hat x_j = r \sum_j g_j (x_j - \mu). \tag{7}
    $$

    Working layout: the values of each channel are gathered as the columns of
    an ``(m, C)`` matrix (a view for a channels-last input such as
    :class:`~mnn.layers.Conv2d`'s output, a copy otherwise); a 4-D output is
    returned in channels-last memory. numpy path: each channel sum is a BLAS
    product with a vector of ones. With numba (:mod:`mnn.jit`) each step is
    one pass over the rows, vectorised over the channels: forward the two sums
    of (1) (float64, deviations from the first row, so $\sigma^2$ does not
    cancel when $|\mu| \gg \sigma$) and the map (2); backward the two sums of
    (6) and the map (7). Cache: the input rows $x$, $\mu$, $r$ and $\gamma r$
    (``(C,)`` each): (7) needs $x - \mu$, not $\hat x$, and not storing
    $\hat x$ saves a write over all $m C$ values.

    Args:
        num_features: $C$.
        eps: $\epsilon$.
        momentum: $\rho$ of (3), or ``None`` for a cumulative average.
        affine: whether to learn $\gamma$ (``weight``, ones) and $\beta$ (``bias``, zeros).
        track_running_stats: keep ``running_mean``, ``running_var`` and ``num_batches_tracked``
            (int64) as buffers and use them in evaluation; without, batch statistics are used always.
    """

    _ndims = (4,)

