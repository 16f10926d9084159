r"""GRU: the gated recurrent unit of ``torch.nn.GRU``, one step derived, then through time."""

from __future__ import annotations

from mnn import jit
from mnn.backend import xp
from mnn.layers.input_projection import accumulate_weight_grads, project_inputs
from mnn.layers.rnn import RecurrentBase, StepProduct


class GRU(RecurrentBase):
    r"""Gated recurrent unit, ``torch.nn.GRU``: gates ``r, z, n`` stacked in that order in every weight.

    Forward, one step, for rows $x_t \in \mathbb{R}^{B \times n}$ and
    $h_{t-1} \in \mathbb{R}^{B \times H}$, with PyTorch's placement of the reset
    gate (it scales $W_{hn} h + b_{hn}$, bias included):

    $$
    a^x = x_t W_{ih}^\top + b_{ih} = [a^x_r, a^x_z, a^x_n], \qquad
    a^h = h_{t-1} W_{hh}^\top + b_{hh} = [a^h_r, a^h_z, a^h_n] \tag{1}
    $$

    $$
    r = \sigma(a^x_r + a^h_r), \qquad z = \sigma(a^x_z + a^h_z) \tag{2}
    $$

    $$
    n = \tanh(a^x_n + r \odot a^h_n) \tag{3}
    $$

    $$
    h_t = (1 - z) \odot n + z \odot h_{t-1} \tag{4}
    $$

    $a^x$ of all $T$ steps is one product before the loop
    (:func:`~mnn.layers.input_projection.project_inputs`; $b_{hr}, b_{hz}$ are added there
    too); the loop computes $a^h$. As in :class:`~mnn.layers.lstm.LSTM`, the
    sigmoids are $\tfrac12(1 + \tanh(\cdot/2))$ with the $r, z$ rows halved once per forward.

    Backward, one step. The partials are element-wise except through (1):

    $$
    \frac{\partial h_{t,bj}}{\partial n_{bk}} = \delta_{jk}(1 - z_{bj}), \quad
    \frac{\partial h_{t,bj}}{\partial z_{bk}} = \delta_{jk}(h_{t-1,bj} - n_{bj}), \quad
    \frac{\partial h_{t,bj}}{\partial h_{t-1,bk}}\Big|_{\text{direct}} = \delta_{jk}\, z_{bj},
    $$

    $$
    \frac{\partial n_{bj}}{\partial a^x_{n,bk}} = \delta_{jk}(1 - n_{bj}^2), \quad
    \frac{\partial n_{bj}}{\partial r_{bk}} = \delta_{jk}(1 - n_{bj}^2)\, a^h_{n,bj}, \quad
    \frac{\partial n_{bj}}{\partial a^h_{n,bk}} = \delta_{jk}(1 - n_{bj}^2)\, r_{bj},
    $$

    $\partial r / \partial a_r = \operatorname{diag}(r(1-r))$, $\partial z / \partial a_z = \operatorname{diag}(z(1-z))$,
    and through (1) $\partial a^h / \partial h_{t-1} = W_{hh}$, $\partial a^x / \partial x_t = W_{ih}$.
    With $g = \partial L / \partial h_t$ (the output's gradient at $t$ plus what step
    $t+1$ carried back), the vector-Jacobian products are

    $$
    \delta n = g \odot (1 - z) \odot (1 - n^2) = \frac{\partial L}{\partial a^x_n} \tag{5}
    $$

    $$
    \frac{\partial L}{\partial a^h_n} = \delta n \odot r, \qquad
    \delta r = \delta n \odot a^h_n \odot r (1 - r) = \frac{\partial L}{\partial a^x_r} = \frac{\partial L}{\partial a^h_r} \tag{6}
    $$

    $$
    \delta z = g \odot (h_{t-1} - n) \odot z (1 - z) = \frac{\partial L}{\partial a^x_z} = \frac{\partial L}{\partial a^h_z} \tag{7}
    $$

    $$
    \frac{\partial L}{\partial h_{t-1}} = g \odot z + \frac{\partial L}{\partial a^h}\, W_{hh} \quad
    (+ \text{the output's gradient at } t-1) \tag{8}
    $$

    Through time: (5)-(8) run for $t = T, \dots, 1$. With
    $G^x = [\partial L / \partial a^x_t]_t$ and $G^h = [\partial L / \partial a^h_t]_t$
    stacked as $(T B) \times 3H$ (they differ only in the $n$ block), after the loop

    $$
    \frac{\partial L}{\partial W_{ih}} = G^{x\top} X, \quad
    \frac{\partial L}{\partial W_{hh}} = G^{h\top} H_{-1}, \quad
    \frac{\partial L}{\partial b_{ih}} = \mathbf{1}^\top G^x, \quad
    \frac{\partial L}{\partial b_{hh}} = \mathbf{1}^\top G^h, \quad
    \frac{\partial L}{\partial X} = G^x W_{ih} \tag{9}
    $$

    With numba (:mod:`mnn.jit`), (5)-(8)'s element-wise part is one compiled pass per step.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as ``torch.nn.GRU`` (see :class:`~mnn.layers.rnn.RecurrentBase`).
        rng: a ``numpy.random.Generator`` for the initialisation and dropout.
        dtype: float32 (default) or float64.

    Cache per layer and direction: $X$ and $h_0, \dots, h_T$ (Eqs. 7-9), the gates
    $r, z, n$ of every step (Eqs. 5-7) and $a^h_n$ (Eq. 6).

    FLOPs: :meth:`~mnn.layers.rnn.RecurrentBase.flops` with $G = 3$, the
    products of (1) forward and of (8), (9) backward.
    """

    GATES = 3

    def _half_sigmoid_rows(self, array):
        """``array`` with its ``r, z`` blocks (rows) halved: the arguments of ``tanh`` in (2)."""
        scaled = array.copy()
        scaled[:2 * self.hidden_size] *= 0.5
        return scaled

    def _forward_direction(self, x, state0, w_ih, w_hh, b_ih, b_hh):
        T, B, _ = x.shape
        H = self.hidden_size
        h = xp.empty((T + 1, B, H), dtype=x.dtype)  # h_0 ... h_T
        hn = xp.empty((T, B, H), dtype=x.dtype)  # a^h_n of every step
        h[0] = state0[0]
        bias = None
        if b_ih is not None:
            bias = b_ih.copy()
            bias[:2 * H] += b_hh[:2 * H]
            bias = self._half_sigmoid_rows(bias)
        gates = project_inputs(x, self._half_sigmoid_rows(w_ih), bias)  # Eq. (1), a^x of all steps: (T, B, 3H)
        recurrent_product = StepProduct(self._half_sigmoid_rows(w_hh).T, B)  # contiguous column blocks
        recurrent = xp.empty((B, 3 * H), dtype=x.dtype)
        for t in range(T):
            a = gates[t]
            recurrent_product(h[t], recurrent)  # Eq. (1): a^h
            rz = a[:, :2 * H]
            rz += recurrent[:, :2 * H]
            xp.tanh(rz, out=rz)  # Eq. (2): sigma = (1 + tanh(a/2)) / 2
            rz += 1.0
            rz *= 0.5
            xp.add(recurrent[:, 2 * H:], 0.0 if b_hh is None else b_hh[2 * H:], out=hn[t])  # Eq. (1): a^h_n
            n = a[:, 2 * H:]
            n += rz[:, :H] * hn[t]
            xp.tanh(n, out=n)  # Eq. (3)
            xp.subtract(h[t], n, out=h[t + 1])
            h[t + 1] *= rz[:, H:]
            h[t + 1] += n  # Eq. (4): n + z (h_{t-1} - n)
        return h[1:], [h[T]], (x, gates, hn, h)

    def _backward_direction(self, doutput, dstateT, cache, weights, grads):
        x, gates, hn, h = cache
        T, _, H = doutput.shape
        w_hh = weights[1]
        dx_pre = xp.empty_like(gates)  # dL/da^x_t, (T, B, 3H)
        dh_pre = xp.empty_like(gates)  # dL/da^h_t, (T, B, 3H)
        dh = dstateT[0].copy()  # gradient reaching h_t from later steps and the final state
        compiled = jit.usable(gates, hn, h, doutput, dh, dx_pre, dh_pre)
        carry, carried = StepProduct(w_hh, dh.shape[0]), xp.empty_like(dh)  # contiguous column blocks of W_hh
        for t in reversed(range(T)):
            a, dax, dah = gates[t], dx_pre[t], dh_pre[t]
            if compiled:
                _gru_cell_backward_kernel(a, hn[t], h[t], doutput[t], dh, dax, dah)  # Eqs. (5)-(7), (8) direct
            else:
                r, z, n = a[:, :H], a[:, H:2 * H], a[:, 2 * H:]
                dh += doutput[t]  # g
                dax[:, 2 * H:] = dh * (1.0 - z) * (1.0 - n * n)  # Eq. (5)
                dah[:, 2 * H:] = dax[:, 2 * H:] * r  # Eq. (6)
                dax[:, :H] = dax[:, 2 * H:] * hn[t] * r * (1.0 - r)  # Eq. (6)
                dax[:, H:2 * H] = dh * (h[t] - n) * z * (1.0 - z)  # Eq. (7)
                dah[:, :2 * H] = dax[:, :2 * H]
                dh *= z  # Eq. (8), the direct path
            dh += carry(dah, carried)  # Eq. (8)
        dx = accumulate_weight_grads(dx_pre, x, dh_pre, h[:T], weights, grads)  # Eq. (9)
        return dx, [dh]


@jit.kernel
def _gru_cell_backward_kernel(a, hn, h_prev, doutput, dh, dax, dah):
    """GRU Eqs. (5)-(7) and the direct path of (8) in one pass (``dh`` in place becomes ``g * z``)."""
    B, H = dh.shape
    for b in range(B):
        for j in range(H):
            r, z, n = a[b, j], a[b, H + j], a[b, 2 * H + j]
            g = dh[b, j] + doutput[b, j]
            dn = g * (1.0 - z) * (1.0 - n * n)  # Eq. (5)
            dax[b, 2 * H + j] = dn
            dah[b, 2 * H + j] = dn * r  # Eq. (6)
            dr = dn * hn[b, j] * r * (1.0 - r)  # Eq. (6)
            dz = g * (h_prev[b, j] - n) * z * (1.0 - z)  # Eq. (7)
            dax[b, j], dah[b, j] = dr, dr
            dax[b, H + j], dah[b, H + j] = dz, dz
            dh[b, j] = g * z  # Eq. (8), the direct path
