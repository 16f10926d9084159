r"""LSTM: the long short-term memory cell of ``torch.nn.LSTM``, one step derived, then through time."""

from __future__ import annotations

from mnn import jit
from mnn.backend import xp
from mnn.layers import lstm_compiled
from mnn.layers.input_projection import accumulate_weight_grads, project_inputs
from mnn.layers.rnn import RecurrentBase, StepProduct


class LSTM(RecurrentBase):
    r"""Long short-term memory, ``torch.nn.LSTM``: gates ``i, f, g, o`` stacked in that order in every weight.

    Forward, one step, for rows $x_t \in \mathbb{R}^{B \times n}$ and the state
    $(h_{t-1}, c_{t-1})$, each $B \times H$:

    $$
    a_t = x_t W_{ih}^\top + b_{ih} + h_{t-1} W_{hh}^\top + b_{hh} = [a^i, a^f, a^g, a^o] \in \mathbb{R}^{B \times 4H} \tag{1}
    $$

    $$
    i = \sigma(a^i), \quad f = \sigma(a^f), \quad g = \tanh(a^g), \quad o = \sigma(a^o) \tag{2}
    $$

    $$
    c_t = f \odot c_{t-1} + i \odot g \tag{3}
    $$

    $$
    h_t = o \odot \tanh(c_t) \tag{4}
    $$

    The input terms of (1) for all $T$ steps are one product before the loop
    (:func:`~mnn.layers.input_projection.project_inputs`); the loop adds $h_{t-1} W_{hh}^\top$.
    (2) is one ``tanh`` over the whole $B \times 4H$ block: since
    $\sigma(a) = \tfrac12(1 + \tanh(a/2))$, the rows of $W_{ih}, W_{hh}, b$ for
    $i, f, o$ are halved once per forward (exact in binary floating point), and
    $\tfrac12(1 + \cdot)$ is applied after the ``tanh``.

    Backward, one step. Each gate is element-wise in its pre-activation:

    $$
    \frac{\partial i_{bj}}{\partial a^i_{bk}} = \delta_{jk}\, i_{bj}(1 - i_{bj}), \quad
    \frac{\partial f_{bj}}{\partial a^f_{bk}} = \delta_{jk}\, f_{bj}(1 - f_{bj}), \quad
    \frac{\partial g_{bj}}{\partial a^g_{bk}} = \delta_{jk}\, (1 - g_{bj}^2), \quad
    \frac{\partial o_{bj}}{\partial a^o_{bk}} = \delta_{jk}\, o_{bj}(1 - o_{bj}),
    $$

    and (3), (4) are element-wise too:
    $\partial c_t / \partial f = c_{t-1}$, $\partial c_t / \partial i = g$,
    $\partial c_t / \partial g = i$, $\partial c_t / \partial c_{t-1} = f$,
    $\partial h_t / \partial o = \tanh c_t$,
    $\partial h_t / \partial c_t = o \odot (1 - \tanh^2 c_t)$. All these
    Jacobians are diagonal (per row $b$); only (1) mixes features, through
    $\partial a_t / \partial h_{t-1} = W_{hh}$ and $\partial a_t / \partial x_t = W_{ih}$.
    With $g^h = \partial L / \partial h_t$ (the output's gradient at $t$ plus what
    step $t+1$ carried back, or the final state's gradient at $t = T$) and $g^c$
    the gradient reaching $c_t$ from step $t+1$ (from $\partial L / \partial c_T$ at $t = T$),
    the vector-Jacobian products are, element-wise:

    $$
    \delta c = g^c + g^h \odot o \odot (1 - \tanh^2 c_t) \tag{5}
    $$

    $$
    \frac{\partial L}{\partial a^o} = g^h \odot \tanh c_t \odot o (1 - o) \tag{6}
    $$

    $$
    \frac{\partial L}{\partial a^i} = \delta c \odot g \odot i (1 - i), \quad
    \frac{\partial L}{\partial a^f} = \delta c \odot c_{t-1} \odot f (1 - f), \quad
    \frac{\partial L}{\partial a^g} = \delta c \odot i \odot (1 - g^2) \tag{7}
    $$

    $$
    \frac{\partial L}{\partial c_{t-1}} = \delta c \odot f \tag{8}
    $$

    $$
    \frac{\partial L}{\partial h_{t-1}} = \frac{\partial L}{\partial a_t}\, W_{hh} \quad (+ \text{the output's gradient at } t-1) \tag{9}
    $$

    Through time: (5)-(9) run for $t = T, \dots, 1$, carrying
    $\partial L / \partial h$ and $\partial L / \partial c$ backwards; what
    leaves step 1 is the gradient of $(h_0, c_0)$. With
    $G = [\partial L / \partial a_t]_t$ stacked as $(T B) \times 4H$, the
    weights' gradients and $\partial L / \partial X$ are one product each,
    after the loop:

    $$
    \frac{\partial L}{\partial W_{ih}} = G^\top X, \quad
    \frac{\partial L}{\partial W_{hh}} = G^\top H_{-1}, \quad
    \frac{\partial L}{\partial b_{ih}} = \frac{\partial L}{\partial b_{hh}} = \mathbf{1}^\top G, \quad
    \frac{\partial L}{\partial X} = G\, W_{ih} \tag{10}
    $$

    ($H_{-1}$ stacks $h_0, \dots, h_{T-1}$). In float32 with numba and OpenBLAS,
    each time loop, (1)-(4) and (5)-(9), is one compiled call that releases the GIL
    (:mod:`mnn.layers.lstm_compiled`); otherwise, with numba (:mod:`mnn.jit`), (5)-(8)
    are one compiled pass per step, and (2)-(3) after the ``tanh`` another.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional:
            as ``torch.nn.LSTM`` (see :class:`~mnn.layers.rnn.RecurrentBase`); no ``proj_size``.
        rng: a ``numpy.random.Generator`` for the initialisation and dropout.
        dtype: float32 (default) or float64.

    Cache per layer and direction: $X$ (Eq. 10), the gates $i, f, g, o$ of every
    step (Eqs. 5-7), $c_0, \dots, c_T$ (Eq. 7 needs $c_{t-1}$), $\tanh c_t$
    (Eqs. 5, 6) and $h_0, \dots, h_T$ (Eq. 10).

    FLOPs: :meth:`~mnn.layers.rnn.RecurrentBase.flops` with $G = 4$, the
    products of (1) forward and of (9), (10) backward.
    """

    GATES = 4
    STATES = 2

    def _half_sigmoid_rows(self, array):
        """``array`` with its ``i, f, o`` blocks (rows) halved: the arguments of ``tanh`` in (2)."""
        H = self.hidden_size
        scaled = array.copy()
        scaled[:2 * H] *= 0.5
        scaled[3 * H:] *= 0.5
        return scaled

    def _forward_direction(self, x, state0, w_ih, w_hh, b_ih, b_hh):
        T, B, _ = x.shape
        H = self.hidden_size
        h = xp.empty((T + 1, B, H), dtype=x.dtype)  # h_0 ... h_T
        c = xp.empty((T + 1, B, H), dtype=x.dtype)  # c_0 ... c_T
        tanh_c = xp.empty((T, B, H), dtype=x.dtype)
        h[0], c[0] = state0
        bias = None if b_ih is None else self._half_sigmoid_rows(b_ih + b_hh)
        if lstm_compiled.can_run(h, c, tanh_c):  # the loop below as one compiled call, without the GIL
            gates = project_inputs(x, self._half_sigmoid_rows(w_ih), None)  # Eq. (1): the loop adds the biases
            lstm_compiled.forward_loop(gates, bias, self._half_sigmoid_rows(w_hh).T, h, c, tanh_c)  # Eqs. (1)-(4)
            return h[1:], [h[T], c[T]], (x, gates, c, tanh_c, h)
        gates = project_inputs(x, self._half_sigmoid_rows(w_ih), bias)  # Eq. (1), halved, all steps: (T, B, 4H)
        recurrent_product = StepProduct(self._half_sigmoid_rows(w_hh).T, B)  # contiguous column blocks
        recurrent = xp.empty((B, 4 * H), dtype=x.dtype)
        compiled = jit.usable(gates, c)
        for t in range(T):
            a = gates[t]
            recurrent_product(h[t], recurrent)
            a += recurrent  # Eq. (1)
            xp.tanh(a, out=a)  # Eq. (2): tanh(a^g) and tanh(a/2) for the sigmoids
            if compiled:
                _lstm_cell_kernel(a, c[t], c[t + 1])  # Eqs. (2), (3)
            else:
                a[:, :2 * H] += 1.0  # Eq. (2): sigma = (1 + tanh(a/2)) / 2
                a[:, :2 * H] *= 0.5
                a[:, 3 * H:] += 1.0
                a[:, 3 * H:] *= 0.5
                xp.multiply(a[:, H:2 * H], c[t], out=c[t + 1])  # Eq. (3)
                c[t + 1] += a[:, :H] * a[:, 2 * H:3 * H]  # Eq. (3)
            xp.tanh(c[t + 1], out=tanh_c[t])  # Eq. (4)
            xp.multiply(a[:, 3 * H:], tanh_c[t], out=h[t + 1])  # Eq. (4)
        return h[1:], [h[T], c[T]], (x, gates, c, tanh_c, h)

    def _backward_direction(self, doutput, dstateT, cache, weights, grads):
        x, gates, c, tanh_c, h = cache
        T, _, H = doutput.shape
        w_hh = weights[1]
        dgates = xp.empty_like(gates)  # dL/da_t for every step, (T, B, 4H)
        dh, dc = dstateT[0].copy(), dstateT[1].copy()  # gradients reaching h_t, c_t from later steps
        if lstm_compiled.can_run(dgates, gates, tanh_c, c, doutput, dh, dc, *grads[:2]):  # the loop below, compiled
            dx = lstm_compiled.backward_loop(gates, c, tanh_c, doutput, dh, dc, dgates, weights, grads,
                                             x, h[:T])  # Eqs. (5)-(10)
            return dx, [dh, dc]
        compiled = jit.usable(dgates, gates, tanh_c, c, doutput, dh, dc)
        carry = StepProduct(w_hh, dh.shape[0])  # contiguous column blocks of W_hh
        for t in reversed(range(T)):
            a, da = gates[t], dgates[t]
            if compiled:
                _lstm_cell_backward_kernel(a, c[t], tanh_c[t], doutput[t], dh, dc, da)  # Eqs. (5)-(8)
            else:
                i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
                dh += doutput[t]  # g^h
                dc += dh * o * (1.0 - tanh_c[t] * tanh_c[t])  # Eq. (5)
                da[:, 3 * H:] = dh * tanh_c[t] * o * (1.0 - o)  # Eq. (6)
                da[:, :H] = dc * g * i * (1.0 - i)  # Eq. (7)
                da[:, H:2 * H] = dc * c[t] * f * (1.0 - f)  # Eq. (7)
                da[:, 2 * H:3 * H] = dc * i * (1.0 - g * g)  # Eq. (7)
                dc *= f  # Eq. (8)
            carry(da, dh)  # Eq. (9)
        dx = accumulate_weight_grads(dgates, x, dgates, h[:T], weights, grads)  # Eq. (10)
        return dx, [dh, dc]


@jit.kernel
def _lstm_cell_kernel(a, c_prev, c):
    """LSTM Eqs. (2)-(3) after the ``tanh``: the sigmoids ``(1 + tanh(a/2)) / 2`` in place, then ``c``."""
    B, H = c.shape
    for b in range(B):
        for j in range(H):
            i = 0.5 * (1.0 + a[b, j])  # Eq. (2)
            f = 0.5 * (1.0 + a[b, H + j])  # Eq. (2)
            o = 0.5 * (1.0 + a[b, 3 * H + j])  # Eq. (2)
            a[b, j], a[b, H + j], a[b, 3 * H + j] = i, f, o
            c[b, j] = f * c_prev[b, j] + i * a[b, 2 * H + j]  # Eq. (3)


@jit.kernel
def _lstm_cell_backward_kernel(a, c_prev, tanh_c, doutput, dh, dc, da):
    """LSTM Eqs. (5)-(8) in one pass: ``dh += doutput``, then ``da`` and ``dc`` (in place, times ``f``)."""
    B, H = dh.shape
    for b in range(B):
        for j in range(H):
            i, f, g, o = a[b, j], a[b, H + j], a[b, 2 * H + j], a[b, 3 * H + j]
            tc = tanh_c[b, j]
            gh = dh[b, j] + doutput[b, j]
            dcv = dc[b, j] + gh * o * (1.0 - tc * tc)  # Eq. (5)
            da[b, 3 * H + j] = gh * tc * o * (1.0 - o)  # Eq. (6)
            da[b, j] = dcv * g * i * (1.0 - i)  # Eq. (7)
            da[b, H + j] = dcv * c_prev[b, j] * f * (1.0 - f)  # Eq. (7)
            da[b, 2 * H + j] = dcv * i * (1.0 - g * g)  # Eq. (7)
            dc[b, j] = dcv * f  # Eq. (8)
