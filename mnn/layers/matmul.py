r"""MatrixProduct: a layer with two inputs, $C = A B$, and both gradients from one upstream gradient."""

from __future__ import annotations

import math

from mnn import blas, precision
from mnn.backend import xp
from mnn.errors import ShapeError
from mnn.module import Module, check_output_grad


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

    FLOPs (:meth:`flops`): forward (1) is $2nkm$ per leading index; backward
    (2) and (3) are $2nkm$ each, $4nkm$ in all.
    """

    def forward(self, q, p, out=None):
        if q.ndim < 2 or p.ndim < 2 or q.shape[:-2] != p.shape[:-2] or q.shape[-1] != p.shape[-2]:
            raise ShapeError(f"{self!r}: cannot multiply Q {tuple(q.shape)} by P {tuple(p.shape)}: "
                             "expected (..., n, k) and (..., k, m) with the same leading dims")
        if precision.active():  # bf16/fp16: both inputs kept in the low format (mnn.precision)
            q, p = precision.store(q), precision.store(p)
            self.cache = (q, p)
            return precision.matmul(q, p, out=out)  # Eq. (1)
        self.cache = (q, p)
        return blas.matmul(q, p, out=out)  # Eq. (1) (numpy's matmul, or MKL: mnn.blas)

    def backward(self, dd):
        q, p = self.pop_cache()
        check_output_grad(self, dd, q.shape[:-1] + p.shape[-1:])
        if precision.active():  # bf16/fp16: the upstream gradient and each product's output rounded
            dd = precision.rounded(dd)
            q, p = precision.load(q), precision.load(p)
            return (precision.rounded(dd @ xp.swapaxes(p, -1, -2)),  # Eq. (2)
                    precision.rounded(xp.swapaxes(q, -1, -2) @ dd))  # Eq. (3)
        dq = blas.matmul(dd, xp.swapaxes(p, -1, -2))  # Eq. (2)
        dp = blas.matmul(xp.swapaxes(q, -1, -2), dd)  # Eq. (3)
        return dq, dp

    def flops(self, q_shape, p_shape) -> tuple[int, int]:
        """``(2nkm, 4nkm)`` times the leading dimensions: Eq. (1), then Eqs. (2) and (3)."""
        *leading, n, k = q_shape
        product = 2 * math.prod(leading) * n * k * p_shape[-1]  # Eq. (1), and each of (2), (3)
        return product, 2 * product
