r"""PReLU: ReLU with a learned slope for negative inputs, one per channel (the layer of ``docs/writing-a-layer.md``)."""

from __future__ import annotations

from mnn.backend import default_dtype, xp
from mnn.errors import ShapeError
from mnn.module import Module, check_output_grad


class PReLU(Module):
    r"""Parametric ReLU, ``torch.nn.PReLU``: $y = \max(x, 0) + a_c \min(x, 0)$ with a learned slope $a_c$.

    Forward, for an input whose channel axis is axis 1 (``(N, C)``,
    ``(N, C, L)``, ``(N, C, H, W)``; a 0-D or 1-D input has no channel
    axis), and element $i$ in channel $c(i)$:

    $$
    y_i = \begin{cases} x_i & x_i > 0 \\ a_{c(i)}\, x_i & x_i \le 0 \end{cases} \tag{1}
    $$

    With ``num_parameters=1`` one slope $a$ is shared by every element.

    Backward. Each output depends on its own input and on its channel's
    slope, so the element partials are

    $$
    \frac{\partial y_i}{\partial x_j} = \delta_{ij}\, s_i, \quad
    s_i = \begin{cases} 1 & x_i > 0 \\ a_{c(i)} & x_i \le 0 \end{cases}, \qquad
    \frac{\partial y_i}{\partial a_c} = [c(i) = c]\, [x_i \le 0]\, x_i.
    $$

    The Jacobian with respect to $x$ is diagonal,
    $J = \operatorname{diag}(s)$, so its vector-Jacobian product with the
    upstream gradient $g$ is an element-wise product:

    $$
    \frac{\partial L}{\partial x} = J^\top g = g \odot s. \tag{2}
    $$

    The Jacobian with respect to $a$ has one column per channel, holding
    $[x_i \le 0]\, x_i$ in the rows of that channel; its transpose applied to
    $g$ sums over every element of the channel (the batch and the positions
    included: every one of them used the same $a_c$):

    $$
    \frac{\partial L}{\partial a_c} = \sum_{i \,:\, c(i) = c} g_i\, [x_i \le 0]\, x_i. \tag{3}
    $$

    (At $x_i = 0$ the slope $a$ is taken, as PyTorch does.)

    Cache: the input $x$: (2) needs its sign and (3) its value.

    Args:
        num_parameters: $C$, the number of slopes: 1, or the input's number of channels.
        init: the initial slope, 0.25 as in PyTorch.
        dtype: of the slopes (default: :func:`mnn.backend.default_dtype`).

    Parameter ``weight`` ``(num_parameters,)``: PyTorch's name, so state dicts move both ways.
    """

    def __init__(self, num_parameters: int = 1, init: float = 0.25, dtype=None) -> None:
        super().__init__()
        if int(num_parameters) != num_parameters or num_parameters < 1:
            raise ValueError(f"PReLU: num_parameters must be a positive integer, got {num_parameters!r}")
        self.num_parameters = int(num_parameters)
        self.add_parameter("weight", xp.full(self.num_parameters, init, dtype=dtype or default_dtype()))

    def _slopes(self, x):
        """The slopes shaped to broadcast against ``x``: ``(C, 1, ..., 1)`` after the batch axis, or a scalar."""
        weight = self.params["weight"].astype(x.dtype, copy=False)
        if self.num_parameters == 1:
            return weight.reshape(())
        if x.ndim < 2 or x.shape[1] != self.num_parameters:
            raise ShapeError(f"{self!r}: expected input (N, {self.num_parameters}, ...), got shape {tuple(x.shape)}")
        return weight.reshape((self.num_parameters,) + (1,) * (x.ndim - 2))

    def forward(self, x):
        slopes = self._slopes(x)
        self.cache = x
        return xp.where(x > 0, x, slopes * x)  # Eq. (1)

    def backward(self, dy):
        x = self.pop_cache()
        check_output_grad(self, dy, x.shape)
        negative = x <= 0
        per_element = xp.where(negative, dy * x, 0)  # Eq. (3): g_i [x_i <= 0] x_i
        if self.num_parameters == 1:
            self.grads["weight"] += per_element.sum()  # Eq. (3): one slope, every element
        else:
            axes = (0,) + tuple(range(2, x.ndim))
            self.grads["weight"] += per_element.sum(axis=axes)  # Eq. (3): sum over all but the channel axis
        return xp.where(negative, dy * self._slopes(x), dy)  # Eq. (2): g * s

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"
