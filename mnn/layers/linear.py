r"""Linear: the affine map $y = x W^\top + b$, the exemplar every other layer follows."""

from __future__ import annotations

import math

import numpy

from mnn import blas, precision
from mnn.backend import default_dtype, xp
from mnn.module import Module, check_input, check_output_grad


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

    FLOPs (:meth:`flops`, matrix products for $N$ rows): forward (1) is $2Nnm$;
    backward (2) and (3) are $2Nnm$ each, $4Nnm$ in all ($2Nnm$ with
    ``input_grad=False``). The bias terms of (1) and (4) are element-wise
    work and not counted.
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
        if precision.active():
            return self._forward_low(x)
        self.cache = x
        y = blas.matmul(x, self.params["weight"].T)  # Eq. (1) (numpy's @, or MKL: mnn.blas)
        if "bias" in self.params:
            y += self.params["bias"]  # Eq. (1)
        return y

    def gradient_temporary_bytes(self) -> int:
        """The bias's ``1^T G`` only, where Eq. (3) adds into the gradient as the product forms (:mod:`mnn.blas`)."""
        grad = self.grads["weight"]
        rows = [xp.empty((1, n), dtype=grad.dtype) for n in grad.shape]
        in_place = blas.can_accumulate(grad, rows[0], rows[1])
        return sum(int(param.nbytes) for key, param in self.params.items() if key != "weight" or not in_place)

    def backward(self, dy):
        x = self.pop_cache()
        check_output_grad(self, dy, x.shape[:-1] + (self.out_features,))
        if precision.active():
            return self._backward_low(x, dy)
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        if blas.can_accumulate(self.grads["weight"], dy2, x2):
            blas.add_at_b(self.grads["weight"], dy2, x2)  # Eq. (3), added as the product forms (mnn.blas)
        else:
            self.grads["weight"] += dy2.T @ x2  # Eq. (3)
        if "bias" in self.params:
            self.grads["bias"] += xp.ones(dy2.shape[0], dtype=dy2.dtype) @ dy2  # Eq. (4): 1^T G
        if not self.input_grad:
            return None
        return blas.matmul(dy, self.params["weight"])  # Eq. (2)

    def _forward_low(self, x):
        """Eq. (1) in bf16/fp16 (:mod:`mnn.precision`): rounded operands, float32 sums, the output rounded; the
        input kept for backward in the low format (half the bytes)."""
        stored = precision.store(x)
        self.cache = stored
        y = precision.load(stored) @ precision.rounded(self.params["weight"]).T  # Eq. (1)
        if "bias" in self.params:
            y += precision.rounded(self.params["bias"])  # Eq. (1)
        return precision.rounded(y)

    def _backward_low(self, stored, dy):
        """Eqs. (2)-(4) in bf16/fp16: the upstream gradient rounded as autocast's, each product's output rounded,
        then added into the float32 gradients."""
        x2 = precision.load(stored).reshape(-1, self.in_features)
        dy = precision.rounded(dy)
        dy2 = dy.reshape(-1, self.out_features)
        self.grads["weight"] += precision.rounded(dy2.T @ x2)  # Eq. (3)
        if "bias" in self.params:
            self.grads["bias"] += precision.rounded(dy2.sum(axis=0))  # Eq. (4)
        if not self.input_grad:
            return None
        return precision.rounded(dy @ precision.rounded(self.params["weight"]))  # Eq. (2)

    def flops(self, x_shape) -> tuple[int, int]:
        """``(2Nnm, 4Nnm)`` (backward ``2Nnm`` without ``input_grad``): Eqs. (1), (2)-(3), for ``x (..., n)``."""
        rows = math.prod(x_shape[:-1])
        product = 2 * rows * self.in_features * self.out_features  # Eq. (1), and each of (2), (3)
        return product, product * (2 if self.input_grad else 1)

    def extra_repr(self) -> str:
        skip = "" if self.input_grad else ", input_grad=False"
        return f"{self.in_features}, {self.out_features}, bias={'bias' in self.params}{skip}"
