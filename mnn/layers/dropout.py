r"""Dropout: zero each element with probability $p$ in training, scale the rest by $1/(1-p)$."""

from __future__ import annotations

import numpy

from mnn.backend import xp
from mnn.module import Module, check_output_grad


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

    @property
    def active(self) -> bool:
        """Whether forward draws a mask (training, ``p > 0``); otherwise it is the identity."""
        return self.training and self.p > 0.0

    def forward(self, x):
        if not self.active:
            self.cache = x.shape  # the identity: only the shape, to check dy against
            return x
        keep = self.rng.random(x.shape, dtype=numpy.float32) >= self.p
        scaled_mask = xp.asarray(keep, dtype=x.dtype) * (1.0 / (1.0 - self.p))
        self.cache = scaled_mask
        return x * scaled_mask  # Eq. (1)

    def backward(self, dy):
        scaled_mask = self.pop_cache()
        if isinstance(scaled_mask, tuple):
            check_output_grad(self, dy, scaled_mask)
            return dy
        check_output_grad(self, dy, scaled_mask.shape)
        return dy * scaled_mask  # Eq. (2)

    def extra_repr(self) -> str:
        return f"p={self.p}"
