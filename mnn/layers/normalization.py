r"""LayerNorm: normalisation whose Jacobian couples every feature of a row (BatchNorm joins it next)."""

from __future__ import annotations

import numpy

from mnn import cuda_kernels, jit
from mnn.backend import default_dtype, xp
from mnn.module import Module, check_input, check_output_grad, grad_enabled


class LayerNorm(Module):
    r"""Normalise each row to zero mean and unit variance, then scale and shift: $y = \gamma \odot \hat x + \beta$.

    Forward, for one row $x \in \mathbb{R}^{C}$:

    $$
    \mu = \frac{1}{C} \sum_{j} x_j, \qquad
    \sigma^2 = \frac{1}{C} \sum_{j} (x_j - \mu)^2, \qquad
    r = \frac{1}{\sqrt{\sigma^2 + \epsilon}}, \tag{1}
    $$

    $$
    \hat x_j = (x_j - \mu)\, r, \qquad y_j = \gamma_j\, \hat x_j + \beta_j. \tag{2}
    $$

    ($\sigma^2$ is the biased variance, as in PyTorch.)

    Backward. First the pieces, using $\partial \mu / \partial x_k = 1/C$:

    $$
    \frac{\partial \sigma^2}{\partial x_k} = \frac{2}{C}(x_k - \mu), \qquad
    \frac{\partial r}{\partial x_k} = -\tfrac{1}{2} (\sigma^2 + \epsilon)^{-3/2} \frac{2}{C}(x_k - \mu)
    = -\frac{r^2\, \hat x_k}{C},
    $$

    then the normalised value, with the quotient and product rules:

    $$
    \frac{\partial \hat x_j}{\partial x_k}
    = r\Big(\delta_{jk} - \frac{1}{C}\Big) + (x_j - \mu) \frac{\partial r}{\partial x_k}
    = \frac{r}{C}\big(C\, \delta_{jk} - 1 - \hat x_j \hat x_k\big).
    $$

    As matrices, $\partial \hat x / \partial x = \frac{r}{C}\big(C I - \mathbf{1}\mathbf{1}^\top - \hat x \hat x^\top\big)$
    (symmetric) and $\partial y / \partial x = \operatorname{diag}(\gamma)\, \partial \hat x / \partial x$.
    With the upstream gradient $g$ and $\hat g = \gamma \odot g$,

    $$
    \frac{\partial L}{\partial x} = \Big(\frac{\partial \hat x}{\partial x}\Big)^{\!\top} \hat g
    = r\Big(\hat g - \frac{1}{C}\sum_j \hat g_j - \hat x\, \frac{1}{C}\sum_j \hat g_j \hat x_j\Big), \tag{3}
    $$

    two row means and element-wise work, $O(C)$ per row instead of the
    $O(C^2)$ Jacobian. The parameters are used by every row, so their
    gradients sum over the $N$ rows:

    $$
    \frac{\partial L}{\partial \gamma} = \sum_{n} g_{n} \odot \hat x_{n}, \qquad
    \frac{\partial L}{\partial \beta} = \sum_{n} g_{n}. \tag{4}
    $$

    Cache (none under :func:`mnn.no_grad`, which writes only $y$):
    $\hat x$ ``(..., C)`` and $r$ ``(..., 1)``. llm.c keeps only
    $(\mu, r)$ because its input buffer is stored anyway and it recomputes
    $\hat x = (x - \mu) r$ in backward. Here the input is not otherwise kept
    (in the pre-LN block the residual stream is not needed by any backward),
    so caching $x$ or caching $\hat x$ holds the same one ``(..., C)`` array
    alive, and keeping $\hat x$, which forward computed anyway, saves two
    passes over it in backward.

    With numba installed (:mod:`mnn.jit`) each pass runs as one compiled loop
    over the rows, reading each row once: (1)-(2) in forward, (3)-(4) in
    backward, the same equations as the numpy code (three to four times
    faster on ``(12, 64, 128)``).

    Args:
        normalized_shape: $C$, the size of the last axis.
        eps: $\epsilon$, added to the variance.
        bias: whether to add $\beta$ (nanoGPT's ``bias=False`` option).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True, dtype=None) -> None:
        super().__init__()
        self.normalized_shape, self.eps = normalized_shape, float(eps)
        dtype = dtype or default_dtype()
        self.add_parameter("weight", xp.ones(normalized_shape, dtype=dtype))
        if bias:
            self.add_parameter("bias", xp.zeros(normalized_shape, dtype=dtype))

    def forward(self, x):
        check_input(self, x, last_dim=self.normalized_shape)
        if jit.usable(x):
            return self._forward_compiled(x)
        if cuda_kernels.usable(x):  # the GPU: Eqs. (1)-(2) in two row reductions and one element-wise pass
            x_hat, rstd, y = cuda_kernels.layernorm_forward(x, self.params["weight"], self.params.get("bias"),
                                                            self.eps)
            self.cache = (x_hat, rstd)
            return y
        inv_C = 1.0 / self.normalized_shape
        # Row sums with einsum: faster than ndarray.mean for short rows, no temporaries.
        centred = x - xp.einsum("...c->...", x)[..., None] * inv_C  # Eq. (1): x - mu
        variance = xp.einsum("...c,...c->...", centred, centred)[..., None] * inv_C  # Eq. (1)
        rstd = 1.0 / xp.sqrt(variance + self.eps)  # Eq. (1): r, (..., 1)
        x_hat = centred
        x_hat *= rstd  # Eq. (2)
        self.cache = (x_hat, rstd)  # kept only if grad is enabled (Module.cache)
        y = x_hat * self.params["weight"]  # Eq. (2)
        if "bias" in self.params:
            y += self.params["bias"]  # Eq. (2)
        return y

    def backward(self, dy):
        x_hat, rstd = self.pop_cache()
        check_output_grad(self, dy, x_hat.shape)
        C = self.normalized_shape
        if jit.usable(dy):
            return self._backward_compiled(dy, x_hat, rstd)
        dy2, x_hat2 = dy.reshape(-1, C), x_hat.reshape(-1, C)
        self.grads["weight"] += xp.einsum("nc,nc->c", dy2, x_hat2)  # Eq. (4)
        if "bias" in self.params:
            self.grads["bias"] += xp.einsum("nc->c", dy2)  # Eq. (4)
        if cuda_kernels.usable(dy, x_hat):  # the GPU: Eq. (3) in one element-wise pass after two row sums
            return cuda_kernels.layernorm_input_grad(dy, self.params["weight"], x_hat, rstd)
        g_hat = dy * self.params["weight"]  # Eq. (3): gamma * g
        mean_g = xp.einsum("...c->...", g_hat)[..., None] * (1.0 / C)  # Eq. (3)
        projection = xp.einsum("...c,...c->...", g_hat, x_hat)[..., None] * (1.0 / C)  # Eq. (3)
        dx = g_hat
        dx -= mean_g  # Eq. (3)
        x_hat *= projection  # x_hat is released (popped): reused as scratch for x_hat * projection
        dx -= x_hat  # Eq. (3)
        dx *= rstd  # Eq. (3)
        return dx

    def _forward_compiled(self, x):
        """Eqs. (1)-(2) row by row in one compiled pass (numpy takes seven), its sums in ``x``'s dtype.

        The sums were float64 until 2026-12-01 (a literal ``0`` started them),
        which numba computes with conversions and half as many numbers per
        vector instruction: on ``(384, 128)`` float32 rows (2 cores of an Intel
        Xeon) forward 32.9 -> 13.1 us and backward 30.6 -> 14.8 us, on
        ``(1024, 384)`` 242 -> 193 and 244 -> 169 us. In float32 the results
        are as close to float64's as PyTorch's float32 LayerNorm (largest
        relative error of y, dx, dweight about 1.2e-7, 1.4e-7, 9e-7 against its
        1.2e-7, 1.6e-7, 4.8e-7); gradient checks run in float64, in float64.
        """
        C = self.normalized_shape
        real = x.dtype.type
        y = xp.empty_like(x)
        # Under no_grad nothing is kept for a backward: no x_hat to write (an empty array tells the loop).
        x_hat = xp.empty_like(x) if grad_enabled() else y.reshape(-1)[:0].reshape(0, C)
        rstd = xp.empty(x.shape[:-1] + (1,), dtype=x.dtype)
        bias = self.params.get("bias", self.params["weight"][:0])
        _layernorm_forward_kernel(x.reshape(-1, C), self.params["weight"], bias, x_hat.reshape(-1, C),
                                  y.reshape(-1, C), rstd.reshape(-1), real(1.0 / C), real(self.eps), real(1.0))
        self.cache = (x_hat, rstd)  # kept only if grad is enabled (Module.cache)
        return y

    def _backward_compiled(self, dy, x_hat, rstd):
        """Eqs. (3)-(4) row by row in one compiled pass, the parameter gradients summed in place."""
        C = self.normalized_shape
        dx = xp.empty_like(dy)
        dbias = self.grads.get("bias", self.grads["weight"][:0])
        _layernorm_backward_kernel(dy.reshape(-1, C), x_hat.reshape(-1, C), rstd.reshape(-1), self.params["weight"],
                                   self.grads["weight"], dbias, dx.reshape(-1, C), dy.dtype.type(1.0 / C))
        return dx

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, bias={'bias' in self.params}"


@jit.kernel(reassociate=True)
def _layernorm_forward_kernel(x, weight, bias, x_hat, y, rstd, inv_C, eps, one):
    """LayerNorm Eqs. (1)-(2) for rows ``x (N, C)``; an empty ``bias`` means none, an empty ``x_hat`` keeps none."""
    N, C = x.shape
    zero = one - one  # of x's dtype (a literal 0 would make the sums float64, and the loop twice as slow)
    for n in range(N):
        total = zero
        for c in range(C):
            total += x[n, c]
        mean = total * inv_C  # Eq. (1): mu
        squares = zero
        for c in range(C):
            d = x[n, c] - mean
            squares += d * d
        r = one / numpy.sqrt(squares * inv_C + eps)  # Eq. (1): r
        rstd[n] = r
        if x_hat.size:  # the test outside the loop over c: a store under a condition would not vectorise
            for c in range(C):
                h = (x[n, c] - mean) * r  # Eq. (2): x_hat
                x_hat[n, c] = h
                y[n, c] = h * weight[c] + bias[c] if bias.size else h * weight[c]  # Eq. (2)
        else:
            for c in range(C):
                h = (x[n, c] - mean) * r  # Eq. (2): x_hat
                y[n, c] = h * weight[c] + bias[c] if bias.size else h * weight[c]  # Eq. (2)


@jit.kernel(reassociate=True)
def _layernorm_backward_kernel(dy, x_hat, rstd, weight, dweight, dbias, dx, inv_C):
    """LayerNorm Eqs. (3)-(4) for rows ``dy (N, C)``; adds into ``dweight`` and ``dbias`` (empty: no bias)."""
    N, C = dy.shape
    zero = inv_C - inv_C  # of dy's dtype, as in the forward loop
    for n in range(N):
        sum_g = zero
        sum_gx = zero
        for c in range(C):
            g_hat = dy[n, c] * weight[c]  # Eq. (3): gamma * g
            sum_g += g_hat
            sum_gx += g_hat * x_hat[n, c]
            dweight[c] += dy[n, c] * x_hat[n, c]  # Eq. (4)
        if dbias.size:
            for c in range(C):
                dbias[c] += dy[n, c]  # Eq. (4)
        mean_g = sum_g * inv_C  # Eq. (3)
        projection = sum_gx * inv_C  # Eq. (3)
        r = rstd[n]
        for c in range(C):
            dx[n, c] = (dy[n, c] * weight[c] - mean_g - x_hat[n, c] * projection) * r  # Eq. (3)
