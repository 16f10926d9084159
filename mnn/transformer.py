r"""The layers of a GPT-2 Transformer: embedding, layer norm, GELU, causal self-attention, MLP, block.

Shapes follow llm.c: ``B`` batch, ``T`` time (tokens), ``C`` channels
(``n_embd``), ``NH`` heads, ``hs = C / NH`` head size, ``V`` vocabulary.
Activations are ``(B, T, C)``; every ``Linear`` is given the rows flattened to
``(B*T, C)`` so that it is one GEMM (numpy runs a 3-D ``@`` as ``B`` separate
products, measurably slower). Each backward docstring derives its gradient
element by element, then as a Jacobian, then as the vector-Jacobian product
the code computes (``\tag{n}`` / ``# Eq. (n)``).
"""

from __future__ import annotations

import math

import numpy

from mnn import jit
from mnn.backend import default_dtype, xp
from mnn.errors import InputError, ShapeError
from mnn.layers import Dropout, Linear, MatrixProduct, Softmax
from mnn.module import Module, check_input, grad_enabled, no_grad


class Embedding(Module):
    r"""A lookup table: token id $i$ selects row $i$ of the weight $W \in \mathbb{R}^{V \times C}$.

    Forward, for ids $i_1, \dots, i_N$ (any shape, flattened here to $N$):

    $$
    y_{n,c} = W_{i_n, c}. \tag{1}
    $$

    Equivalently $Y = S W$ with the one-hot selection matrix
    $S \in \{0, 1\}^{N \times V}$, $S_{nv} = [i_n = v]$; the code never forms $S$
    and gathers rows instead (``take``).

    Backward. The element partials of (1) are

    $$
    \frac{\partial y_{n,c}}{\partial W_{v,d}} = [i_n = v]\, \delta_{cd},
    $$

    i.e. the Jacobian of $\operatorname{vec} Y$ with respect to $\operatorname{vec} W$
    is $S \otimes I_C$. Its transpose applied to the upstream gradient $G$ is
    $S^\top G$: row $v$ of the weight gradient sums the gradient rows of every
    position that looked up $v$ (a *scatter-add*):

    $$
    \frac{\partial L}{\partial W_{v,:}} = \sum_{n \,:\, i_n = v} G_{n,:}. \tag{2}
    $$

    The ids are integers, so there is no input gradient (``backward`` returns ``None``).

    How (2) is computed. ``numpy.add.at`` is the obvious scatter-add and is
    slow. Measured (numpy 2.4, float32, accumulating into an existing
    gradient, best of 15 runs, microseconds, 2 BLAS threads on a shared machine):

    | ids $N$, $V$, $C$     | ``add.at`` | one-hot GEMM | flat ``bincount`` | sorted segments |
    |-----------------------|-----------:|-------------:|------------------:|----------------:|
    | 768, 65, 128          |        841 |          128 |               775 |             129 |
    | 3072, 65, 384         |      10092 |         3152 |              9288 |            2837 |
    | 768, 1024, 128        |       1203 |        11201 |               491 |             889 |
    | 8192, 50257, 768      |      56567 |  (too large) |            102667 |           62715 |

    The one-hot GEMM $S^\top G$ ties at $V = 65$ but costs $N V C$ and
    allocates $V \times N$; a ``bincount`` over flattened ``(id, column)``
    pairs accumulates in float64 into a $V \times C$ array. The sorted-segment
    sum (sort the ids, sum each run of equal ids with ``add.reduceat``, add the
    $U \le N$ sums to their rows) costs $O(N \log N + N C)$ whatever $V$ is,
    is the fastest or tied where ids repeat (a character vocabulary), and
    CuPy has every piece of it, so it is the one used. When nearly every id
    is distinct (GPT-2's 50257 tokens) nothing is saved by grouping and it is
    about as fast as ``add.at``.

    Args:
        num_embeddings: $V$, the number of rows (ids ``0 .. V-1``).
        embedding_dim: $C$, the size of each row.
        rng: a ``numpy.random.Generator`` for the initialisation, $\mathcal{N}(0, 1)$ as in PyTorch.

    Cache: the ids (``int``, the input's shape), nothing else.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        rng = rng if rng is not None else numpy.random.default_rng()
        weight = rng.standard_normal((num_embeddings, embedding_dim))
        self.add_parameter("weight", xp.asarray(weight, dtype=dtype or default_dtype()))

    def check_ids(self, ids) -> None:
        """Refuse non-integer ids (ShapeError) and ids outside ``[0, V)`` (InputError), naming the bad id."""
        if not xp.issubdtype(getattr(ids, "dtype", numpy.dtype(float)), xp.integer):
            raise ShapeError(f"{self!r}: ids must be an integer array, got dtype {getattr(ids, 'dtype', type(ids))}")
        if ids.size == 0:
            return
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= self.num_embeddings:
            bad = lowest if lowest < 0 else highest
            raise InputError(f"{self!r}: id {bad} out of range [0, {self.num_embeddings})")

    def forward(self, ids):
        self.check_ids(ids)
        self.cache = ids
        return xp.take(self.params["weight"], ids, axis=0)  # Eq. (1)

    def backward(self, dy):
        ids = self.pop_cache().reshape(-1)
        rows = dy.reshape(-1, self.embedding_dim)
        order = xp.argsort(ids)
        sorted_ids = ids[order]
        run_starts = xp.flatnonzero(xp.concatenate((xp.ones(1, dtype=bool), sorted_ids[1:] != sorted_ids[:-1])))
        sums = xp.add.reduceat(xp.take(rows, order, axis=0), run_starts, axis=0)  # Eq. (2): one sum per id
        self.grads["weight"][sorted_ids[run_starts]] += sums  # Eq. (2): the ids are unique here
        return None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


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
        C = self.normalized_shape
        if jit.usable(dy):
            return self._backward_compiled(dy, x_hat, rstd)
        dy2, x_hat2 = dy.reshape(-1, C), x_hat.reshape(-1, C)
        self.grads["weight"] += xp.einsum("nc,nc->c", dy2, x_hat2)  # Eq. (4)
        if "bias" in self.params:
            self.grads["bias"] += xp.einsum("nc->c", dy2)  # Eq. (4)
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
        """Eqs. (1)-(2) row by row in one compiled pass (numpy takes seven)."""
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
    for n in range(N):
        total = x[n, 0] * 0
        for c in range(C):
            total += x[n, c]
        mean = total * inv_C  # Eq. (1): mu
        squares = total * 0
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
    for n in range(N):
        sum_g = dy[n, 0] * 0
        sum_gx = dy[n, 0] * 0
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
        if jit.usable(x, gate, dy):
            dx = xp.empty_like(dy)
            real = x.dtype.type
            _gelu_backward_kernel(jit.flat(x), jit.flat(gate), jit.flat(dy), jit.flat(dx), real(1.0),
                                  real(2.0 * _SQRT_2_OVER_PI), real(6.0 * _GELU_CUBIC * _SQRT_2_OVER_PI))
            return dx
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


class MultiHeadAttention(Module):
    r"""Multi-head (causal) self-attention, nanoGPT's ``CausalSelfAttention``.

    Forward, for one sequence $X \in \mathbb{R}^{T \times C}$ (the batch and the
    $NH$ heads are independent, so every step below is one batched operation
    over ``(B, NH)``; no loop over heads or tokens):

    $$
    [\,Q_{\text{all}} \;\; K_{\text{all}} \;\; V_{\text{all}}\,] = X W_{\text{attn}}^\top + b_{\text{attn}}
    \quad (\mathtt{c\_attn},\ C \to 3C), \tag{1}
    $$

    and head $h$ takes columns $h\,hs, \dots, (h+1)\,hs - 1$ of each, giving
    $Q, K, V \in \mathbb{R}^{T \times hs}$, $hs = C / NH$. With $s = 1/\sqrt{hs}$:

    $$
    S = (s\, Q)\, K^\top, \qquad
    \tilde S_{ij} = \begin{cases} S_{ij} & j \le i \\ -\infty & j > i \ \text{(causal only)} \end{cases} \tag{2}
    $$

    $$
    P = \operatorname{softmax}_{\text{rows}}(\tilde S), \qquad A = \operatorname{dropout}(P), \qquad Y = A\, V, \tag{3}
    $$

    then the heads are laid side by side again, $Y_{\text{all}} \in \mathbb{R}^{T \times C}$,
    and projected: $\text{out} = \operatorname{dropout}(Y_{\text{all}} W_{\text{proj}}^\top + b_{\text{proj}})$
    (``c_proj``). Scaling $Q$ ($T \cdot hs$ numbers) instead of $S$ ($T^2$)
    is the same product with less work. A $-\infty$ score becomes a
    probability of exactly 0, so position $i$ never sees a later token.

    Backward. The two matrix products are :class:`~mnn.layers.MatrixProduct`
    layers, whose derivation gives (element partials
    $\partial Y_{ia} / \partial A_{ij} = V_{ja}$ and
    $\partial Y_{ia} / \partial V_{jb} = A_{ij}\,\delta_{ab}$, Jacobians
    $I_T \otimes V^\top$ and $A \otimes I_{hs}$), for $G = \partial L / \partial Y$:

    $$
    \frac{\partial L}{\partial A} = G\, V^\top, \qquad \frac{\partial L}{\partial V} = A^\top G. \tag{4}
    $$

    Dropout multiplies by its mask, and the softmax (Jacobian
    $\operatorname{diag}(p) - p\,p^\top$ per row) gives, with $\bar P = \partial L / \partial P$,

    $$
    \frac{\partial L}{\partial \tilde S} = P \odot \Big(\bar P - \big(\textstyle\sum_j \bar P_{ij} P_{ij}\big)_i\Big). \tag{5}
    $$

    The mask adds a constant, so $\partial \tilde S / \partial S = I$: the
    gradient passes through unchanged, and it is already 0 at every masked
    entry because $P_{ij} = 0$ there. Writing $\bar S = \partial L / \partial S$,
    the score partials

    $$
    \frac{\partial S_{ij}}{\partial Q_{ia}} = s\, K_{ja}, \qquad
    \frac{\partial S_{ij}}{\partial K_{la}} = s\, \delta_{jl}\, Q_{ia}
    $$

    (Jacobians $s\,(I_T \otimes K)$ and $s\,(Q \otimes I_T)$ composed with the
    transpose) contract to

    $$
    \frac{\partial L}{\partial Q} = s\, \bar S\, K, \qquad
    \frac{\partial L}{\partial K} = s\, \bar S^\top Q. \tag{6}
    $$

    ``MatrixProduct`` returns $\bar S K$ and $(sQ)^\top \bar S$, the gradients
    with respect to its inputs $sQ$ and $K^\top$; one more factor $s$ and one
    transpose give (6). Splitting and merging heads only permute elements (a
    permutation-matrix Jacobian $\Pi$), so their vector-Jacobian product
    $\Pi^\top g$ is the inverse permutation: the three head gradients are
    written back side by side into one ``(B, T, 3C)`` array for ``c_attn``.

    Args:
        n_embd: $C$.
        n_head: $NH$; must divide $C$.
        causal: mask out later positions (GPT); ``False`` for full attention.
        dropout: probability for the attention-weights and the output dropout.
        bias: biases in ``c_attn`` and ``c_proj``.
        rng: a ``numpy.random.Generator`` for the initialisation and dropout masks.

    Cache: only $(B, T)$ here; each sub-layer keeps its own: ``c_attn`` its
    input, the two products their factors ($sQ$, $K^\top$ and $A$, $V$, views
    into one buffer), the softmax $P$, dropout its mask, ``c_proj`` $Y_{\text{all}}$.
    """

    def __init__(self, n_embd: int, n_head: int, causal: bool = True, dropout: float = 0.0,
                 bias: bool = True, rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"MultiHeadAttention: n_embd {n_embd} is not divisible by n_head {n_head}")
        rng = rng if rng is not None else numpy.random.default_rng()
        self.n_embd, self.n_head, self.causal, self.dropout = n_embd, n_head, causal, dropout
        self.head_size = n_embd // n_head
        self.scale = 1.0 / math.sqrt(self.head_size)
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias, rng=rng, dtype=dtype)
        self.scores = MatrixProduct()
        self.softmax = Softmax(axis=-1)
        self.attn_dropout = Dropout(dropout, rng=rng)
        self.weighted_sum = MatrixProduct()
        self.c_proj = Linear(n_embd, n_embd, bias=bias, rng=rng, dtype=dtype)
        self.resid_dropout = Dropout(dropout, rng=rng)
        self._masks: dict = {}

    def causal_mask(self, T: int, T_keys: int | None = None, dtype=None):
        r"""The additive mask ``(T, T_keys)``: 0 where query $i$ may see key $j$, $-\infty$ where not.

        Queries are the last ``T`` of ``T_keys`` positions (``T_keys > T`` when
        earlier keys come from a key/value cache), so query $i$ sees keys
        $j \le i + T_{\text{keys}} - T$: rows ``T_keys - T .. T_keys - 1`` of the
        square causal mask. One square mask per dtype is kept (grown when a
        longer sequence arrives) and sliced, a view.
        """
        T_keys = T if T_keys is None else T_keys
        dtype = numpy.dtype(dtype or default_dtype())
        square = self._masks.get(dtype.name)
        if square is None or square.shape[0] < T_keys:
            square = xp.triu(xp.full((T_keys, T_keys), -xp.inf, dtype=dtype), k=1)
            self._masks[dtype.name] = square
        return square[T_keys - T:T_keys, :T_keys]

    @staticmethod
    def own_scores(scores):
        """Each query's score against its own key, ``(..., T, 1)``: the softmax shift (never masked)."""
        T, T_keys = scores.shape[-2:]
        return xp.diagonal(scores, offset=T_keys - T, axis1=-2, axis2=-1)[..., None].copy()

    def merge_view(self, y_all):
        """``(B, T, C)`` seen as ``(B, NH, T, hs)``: head ``h`` is columns ``h hs .. (h+1) hs - 1`` (a view)."""
        B, T, _ = y_all.shape
        return y_all.reshape(B, T, self.n_head, self.head_size).transpose(0, 2, 1, 3)

    def split_heads(self, qkv, B: int, T: int):
        """``(B*T, 3C)`` -> three views ``(B, NH, T, hs)`` (strided, no copy)."""
        return qkv.reshape(B, T, 3, self.n_head, self.head_size).transpose(2, 0, 3, 1, 4)

    def forward(self, x):
        check_input(self, x, last_dim=self.n_embd, ndim=3)
        B, T, C = x.shape
        qkv = self.c_attn.forward(x.reshape(B * T, C))  # Eq. (1)
        q, k, v = self.split_heads(qkv, B, T)
        q *= self.scale  # Eq. (2): s Q, in place in c_attn's fresh output (c_attn keeps its input, not this)
        scores = self.scores.forward(q, xp.swapaxes(k, -1, -2))  # Eq. (2): S = (sQ) K^T
        mask = self.causal_mask(T, dtype=scores.dtype) if self.causal else None  # Eq. (2): -inf above the diagonal
        probs = self.softmax.forward(scores, mask, self.own_scores(scores), out=scores)  # Eq. (3), in place
        probs = self.attn_dropout.forward(probs)  # Eq. (3)
        y = xp.empty((B, T, C), dtype=probs.dtype)  # the heads side by side: Y_all
        self.weighted_sum.forward(probs, v, out=self.merge_view(y))  # Eq. (3): Y = A V, written merged
        out = self.resid_dropout.forward(self.c_proj.forward(y.reshape(B * T, C)))
        self.cache = (B, T)
        return out.reshape(B, T, C)

    def backward(self, dy):
        B, T = self.pop_cache()
        C, NH, hs = self.n_embd, self.n_head, self.head_size
        dy = self.c_proj.backward(self.resid_dropout.backward(dy.reshape(B * T, C)))
        dy = self.merge_view(dy.reshape(B, T, C))  # un-merge heads: a strided view
        dprobs, dv = self.weighted_sum.backward(dy)  # Eq. (4)
        dscores = self.softmax.backward(self.attn_dropout.backward(dprobs))  # Eq. (5)
        dq_scaled, dk_transposed = self.scores.backward(dscores)  # Eq. (6) before the factor s
        dqkv = xp.empty((B, T, 3, NH, hs), dtype=dy.dtype)
        dq, dk, dv_slot = self.split_heads(dqkv, B, T)
        xp.multiply(dq_scaled, self.scale, out=dq)  # Eq. (6): dQ = s (dS K)
        dk[...] = xp.swapaxes(dk_transposed, -1, -2)  # Eq. (6): dK = s dS^T Q (s is inside sQ)
        dv_slot[...] = dv  # Eq. (4)
        return self.c_attn.backward(dqkv.reshape(B * T, 3 * C)).reshape(B, T, C)

    @no_grad()
    def forward_cached(self, x, past=None):
        r"""Inference-only attention of new tokens over cached and new keys: ``(out, (K, V))``.

        ``x (B, T_new, C)`` holds the new positions; ``past`` is ``(K, V)``, each
        ``(B, NH, T_past, hs)``, from earlier calls (or ``None``). The new keys and
        values are appended, and the queries attend over all $T_{\text{past}} + T_{\text{new}}$
        keys with the causal mask shifted by $T_{\text{past}}$: the same rows the
        full forward computes. No dropout and nothing cached for backward.
        """
        check_input(self, x, last_dim=self.n_embd, ndim=3)
        B, T, C = x.shape
        q, k, v = self.split_heads(self.c_attn.forward(x.reshape(B * T, C)), B, T)  # Eq. (1)
        if past is not None:
            k = xp.concatenate((past[0], k), axis=2)
            v = xp.concatenate((past[1], v), axis=2)
        scores = (q * self.scale) @ xp.swapaxes(k, -1, -2)  # Eq. (2)
        mask = self.causal_mask(T, k.shape[2], dtype=scores.dtype) if self.causal else None  # Eq. (2)
        probs = self.softmax.forward(scores, mask, self.own_scores(scores), out=scores)  # Eq. (3)
        y = xp.empty((B, T, C), dtype=probs.dtype)
        xp.matmul(probs, v, out=self.merge_view(y))  # Eq. (3), heads merged
        out = self.c_proj.forward(y.reshape(B * T, C))
        return out.reshape(B, T, C), (k, v)

    def extra_repr(self) -> str:
        return f"n_embd={self.n_embd}, n_head={self.n_head}, causal={self.causal}, dropout={self.dropout}"


class MLP(Module):
    r"""The block's feed-forward part: ``c_fc`` ($C \to 4C$), GELU, ``c_proj`` ($4C \to C$), dropout.

    Forward, per token: $\text{out} = \operatorname{dropout}\big(W_2\, \operatorname{GELU}(W_1 x + b_1) + b_2\big)$.
    Backward is the chain rule through the four layers in reverse, each
    layer's own vector-Jacobian product (see :class:`~mnn.layers.Linear`,
    :class:`GELU`, :class:`~mnn.layers.Dropout`). Cache: ``(B, T)`` only.
    """

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = True,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng()
        self.n_embd = n_embd
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias, rng=rng, dtype=dtype)
        self.gelu = GELU()
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias, rng=rng, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)

    def forward(self, x):
        check_input(self, x, last_dim=self.n_embd, ndim=3)
        B, T, C = x.shape
        h = self.gelu.forward(self.c_fc.forward(x.reshape(B * T, C)))
        out = self.dropout.forward(self.c_proj.forward(h))
        self.cache = (B, T)
        return out.reshape(B, T, C)

    def backward(self, dy):
        B, T = self.pop_cache()
        C = self.n_embd
        dh = self.c_proj.backward(self.dropout.backward(dy.reshape(B * T, C)))
        return self.c_fc.backward(self.gelu.backward(dh)).reshape(B, T, C)


class Block(Module):
    r"""One pre-LN Transformer block: $x + \operatorname{attn}(\operatorname{ln}_1 x)$, then $+ \operatorname{mlp}(\operatorname{ln}_2 \cdot)$.

    Forward:

    $$
    h = x + \operatorname{attn}\big(\operatorname{LN}_1(x)\big), \qquad
    z = h + \operatorname{mlp}\big(\operatorname{LN}_2(h)\big). \tag{1}
    $$

    Backward. A residual connection $z = h + f(h)$ has Jacobian
    $\partial z / \partial h = I + J_f$, so its vector-Jacobian product is the
    sum of the two paths, the identity path and the branch:

    $$
    \frac{\partial L}{\partial h} = g_z + J_{\text{mlp} \circ \text{LN}_2}^\top\, g_z, \qquad
    \frac{\partial L}{\partial x} = g_h + J_{\text{attn} \circ \text{LN}_1}^\top\, g_h, \tag{2}
    $$

    with $g_z = \partial L / \partial z$ and $g_h = \partial L / \partial h$.
    The identity path is why gradients reach early layers undiminished.
    Cache: nothing (the sub-layers keep theirs).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 causal: bool = True, rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        rng = rng if rng is not None else numpy.random.default_rng()
        self.ln_1 = LayerNorm(n_embd, bias=bias, dtype=dtype)
        self.attn = MultiHeadAttention(n_embd, n_head, causal=causal, dropout=dropout, bias=bias,
                                       rng=rng, dtype=dtype)
        self.ln_2 = LayerNorm(n_embd, bias=bias, dtype=dtype)
        self.mlp = MLP(n_embd, dropout=dropout, bias=bias, rng=rng, dtype=dtype)

    def forward(self, x):
        # The branch outputs are fresh arrays that nothing else holds: add in place.
        h = self.attn.forward(self.ln_1.forward(x))
        h += x  # Eq. (1)
        z = self.mlp.forward(self.ln_2.forward(h))
        z += h  # Eq. (1)
        return z

    def backward(self, dz):
        dh = self.ln_2.backward(self.mlp.backward(dz))
        dh += dz  # Eq. (2): branch + identity path
        dx = self.ln_1.backward(self.attn.backward(dh))
        dx += dh  # Eq. (2)
        return dx
