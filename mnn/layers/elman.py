r"""RNN: the Elman recurrent network of ``torch.nn.RNN`` (tanh or ReLU), one step derived, then through time.

The stack, the state-dict names and backpropagation through time are
:class:`~mnn.layers.rnn.RecurrentBase`'s (read :mod:`mnn.layers.rnn` first);
this file is the cell.
"""

from __future__ import annotations

import numpy

from mnn.backend import xp
from mnn.layers.input_projection import accumulate_weight_grads, project_inputs
from mnn.layers.rnn import RecurrentBase, StepProduct


class RNN(RecurrentBase):
    r"""Elman recurrent network, ``torch.nn.RNN``: $h_t = \phi(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})$.

    Forward, one step, for a batch of rows $x_t \in \mathbb{R}^{B \times n}$,
    $h_{t-1} \in \mathbb{R}^{B \times H}$ and $\phi = \tanh$ or ReLU
    (``nonlinearity``):

    $$
    a_t = x_t W_{ih}^\top + b_{ih} + h_{t-1} W_{hh}^\top + b_{hh}, \qquad h_t = \phi(a_t). \tag{1}
    $$

    The input terms $x_t W_{ih}^\top + b_{ih} + b_{hh}$ of all $T$ steps are
    one product before the loop (:func:`project_inputs`); the loop adds
    $h_{t-1} W_{hh}^\top$ and applies $\phi$.

    Backward, one step. The element partials of (1) are

    $$
    \frac{\partial h_{t,bi}}{\partial a_{t,bj}} = \delta_{ij}\, \phi'(a_{t,bi}), \qquad
    \frac{\partial a_{t,bi}}{\partial h_{t-1,bj}} = (W_{hh})_{ij}, \qquad
    \frac{\partial a_{t,bi}}{\partial x_{t,bj}} = (W_{ih})_{ij},
    $$

    with $\phi'(a) = 1 - h^2$ for tanh and $\mathbb{1}[a > 0] = \mathbb{1}[h > 0]$
    for ReLU: both functions of the output $h$ alone. So the Jacobian
    $\partial h_t / \partial h_{t-1} = \operatorname{diag}(\phi'(a_t))\, W_{hh}$
    (per row) and the gradient $\partial L / \partial h_t = g_t$ (the output's
    gradient at $t$ plus what step $t+1$ carried back) becomes

    $$
    \frac{\partial L}{\partial a_t} = g_t \odot \phi'(a_t) \tag{2}
    $$

    $$
    \frac{\partial L}{\partial h_{t-1}} \mathrel{+}= \frac{\partial L}{\partial a_t}\, W_{hh} \tag{3}
    $$

    Through time: (2) and (3) run for $t = T, \dots, 1$; with
    $G = [\partial L/\partial a_t]_t$ stacked as $(T B) \times H$, after the loop

    $$
    \frac{\partial L}{\partial W_{ih}} = G^\top X, \quad
    \frac{\partial L}{\partial W_{hh}} = G^\top H_{-1}, \quad
    \frac{\partial L}{\partial b_{ih}} = \frac{\partial L}{\partial b_{hh}} = \mathbf{1}^\top G, \quad
    \frac{\partial L}{\partial X} = G\, W_{ih} \tag{4}
    $$

    where $H_{-1}$ stacks $h_0, \dots, h_{T-1}$.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as ``torch.nn.RNN`` (see :class:`RecurrentBase`).
        nonlinearity: ``"tanh"`` or ``"relu"``.
        rng: a ``numpy.random.Generator`` for the initialisation and dropout.
        dtype: float32 (default) or float64.

    Cache per layer and direction: the input $X$ and $h_0, \dots, h_T$ (Eq. 4 needs
    $X$ and $H_{-1}$; Eq. 2 needs $\phi'$, a function of $h_t$).

    FLOPs: :meth:`RecurrentBase.flops` with $G = 1$, the products of (1)
    forward and of (3), (4) backward.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, rng, dtype)

    def _forward_direction(self, x, state0, w_ih, w_hh, b_ih, b_hh):
        T, B, _ = x.shape
        h = xp.empty((T + 1, B, self.hidden_size), dtype=x.dtype)  # h_0 ... h_T
        h[0] = state0[0]
        a = project_inputs(x, w_ih, None if b_ih is None else b_ih + b_hh)  # Eq. (1), input terms, all steps
        recurrent_product = StepProduct(w_hh.T, B)  # contiguous blocks: a transposed view is 3-6x slower
        recurrent = xp.empty((B, self.hidden_size), dtype=x.dtype)
        for t in range(T):
            a[t] += recurrent_product(h[t], recurrent)  # Eq. (1)
            if self.nonlinearity == "tanh":
                xp.tanh(a[t], out=h[t + 1])  # Eq. (1)
            else:
                xp.maximum(a[t], 0, out=h[t + 1])  # Eq. (1)
        return h[1:], [h[T]], (x, h)

    def _backward_direction(self, doutput, dstateT, cache, weights, grads):
        x, h = cache
        T = x.shape[0]
        w_hh = weights[1]
        da = xp.empty_like(doutput)  # dL/da_t for every step, (T, B, H)
        dh = dstateT[0].copy()  # gradient reaching h_t from later steps and the final state
        carry = StepProduct(w_hh, dh.shape[0])
        for t in reversed(range(T)):
            dh += doutput[t]  # g_t: the output's gradient plus what step t+1 carried
            if self.nonlinearity == "tanh":
                xp.multiply(dh, 1 - h[t + 1] * h[t + 1], out=da[t])  # Eq. (2)
            else:
                xp.multiply(dh, h[t + 1] > 0, out=da[t])  # Eq. (2)
            carry(da[t], dh)  # Eq. (3)
        dx = accumulate_weight_grads(da, x, da, h[:T], weights, grads)  # Eq. (4)
        return dx, [dh]

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")
