r"""Recurrent layers as ``torch.nn``'s: the stack they share (:class:`RecurrentBase`), its time-loop product.

Read this file first, then the cells: :mod:`mnn.layers.elman` (the Elman
:class:`~mnn.layers.RNN`), :mod:`mnn.layers.lstm` and :mod:`mnn.layers.gru`.
Every recurrent layer here is a stack of ``num_layers`` layers (each with one
or two directions) of one *cell*. The stack is the same for all three cells
and lives in :class:`RecurrentBase`: shapes, state-dict names, dropout between
layers, the reversed direction, and the order of the backward pass. A cell
class supplies two functions, one direction of one layer over the whole
sequence: ``_forward_direction`` and ``_backward_direction``.

Backpropagation through time, once for all cells. A layer applies the same
step $s_t = \mathrm{cell}(x_t, s_{t-1})$ at every time step, so its loss
depends on $s_{t-1}$ through $s_t$ and directly through $h_{t-1}$ (the
layer's output at $t-1$). Walking back from $t = T$ to 1, the gradient
reaching the state after step $t$ is

$$
\frac{\partial L}{\partial s_t} = \underbrace{\frac{\partial L}{\partial y_t}}_{\text{the layer's output}}
+ \underbrace{\Big(\frac{\partial s_{t+1}}{\partial s_t}\Big)^{\!\top} \frac{\partial L}{\partial s_{t+1}}}_{\text{carried from step } t+1},
\qquad \frac{\partial L}{\partial s_T} = \frac{\partial L}{\partial y_T} + \frac{\partial L}{\partial s_T}\Big|_{\text{final state}},
$$

and what is carried past $t = 1$ is the gradient of the initial state. The
weights are shared by all steps, so their gradients are sums over $t$; with
the gradients of the pre-activations of all steps stacked into one
$(T B) \times (\text{gates}\cdot H)$ matrix, each sum is one matrix product
taken after the loop (like Linear's Eq. 3), and so is $\partial L/\partial X$.
Only the product with $W_{hh}$ stays inside the loop: it is what carries the
gradient from one step to the previous one.
"""

from __future__ import annotations

import math

import numpy

from mnn.backend import default_dtype, xp
from mnn.errors import ShapeError
from mnn.layers.input_projection import TableLookup
from mnn.module import Module, check_output_grad


class RecurrentBase(Module):
    r"""A stack of recurrent layers, time-major or batch-first, one or two directions, as ``torch.nn.RNNBase``.

    Shapes (``T`` time steps, ``B`` sequences, ``H = hidden_size``, ``L = num_layers``,
    ``D = 2`` if bidirectional else 1): the input is ``(T, B, input_size)``
    (``(B, T, input_size)`` with ``batch_first``), the output ``(T, B, D*H)``
    (``(B, T, D*H)``), each state ``(L*D, B, H)`` whatever ``batch_first``.
    Layer ``k`` reads the output of layer ``k-1`` (``D*H`` features), through
    dropout in training when ``dropout > 0``; its reversed direction reads the
    sequence backwards and writes its output in forward time order, in the
    second half of the features.

    Parameters, per layer ``k`` and direction (suffix ``_reverse`` for the
    second), with the gate blocks stacked along the rows as in PyTorch:
    ``weight_ih_l{k}`` ``(G*H, in)``, ``weight_hh_l{k}`` ``(G*H, H)``,
    ``bias_ih_l{k}`` and ``bias_hh_l{k}`` ``(G*H,)``, with ``G`` = 1 (RNN),
    4 (LSTM: ``i, f, g, o``), 3 (GRU: ``r, z, n``), all initialised
    $U(-1/\sqrt{H}, 1/\sqrt{H})$. A state dict moves to and from
    ``torch.nn.RNN``/``LSTM``/``GRU`` unchanged.

    Cache: per layer and direction, what the cell's backward needs (its
    docstring says what), and the dropout masks.

    FLOPs (:meth:`flops`, matrix products), per layer and direction with $n$
    input features, $G$ gate blocks, $T$ steps of $B$ rows: forward, the input
    projections $2TBnGH$ (one product) and the recurrent products
    $h_{t-1} W_{hh}^\top$, $2BHGH$ at each of the $T$ steps (the first too,
    with $h_0$); backward, the product with $W_{hh}$ that carries the gradient
    to $h_{t-1}$ at every step ($2TBGH^2$, the last giving
    $\partial L / \partial h_0$), then $\partial L / \partial W_{ih}$ and
    $\partial L / \partial X$ ($2TBnGH$ each) and $\partial L / \partial W_{hh}$
    ($2TBGH^2$): $4TBGH(n + H)$, twice the forward. These are the model's
    products, as ``torch.nn``'s count them, also when layer 0 reads a
    :class:`~mnn.layers.input_projection.TableLookup` and runs its input
    products over the $V$ table rows instead of the $TB$ positions.
    """

    GATES = 1  # gate blocks stacked in each weight
    STATES = 1  # arrays in the state: h (RNN, GRU) or h, c (LSTM)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 rng: numpy.random.Generator | None = None, dtype=None) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if int(value) != value or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional = bool(bidirectional)
        self.directions = 2 if self.bidirectional else 1
        self.rng = rng if rng is not None else numpy.random.default_rng()
        dtype = dtype or default_dtype()
        bound = 1.0 / math.sqrt(hidden_size)
        rows = self.GATES * hidden_size
        for k in range(self.num_layers):
            fan_in = self.input_size if k == 0 else self.directions * hidden_size
            for suffix in self._suffixes():
                shapes = [("weight_ih", (rows, fan_in)), ("weight_hh", (rows, hidden_size))]
                if self.bias:
                    shapes += [("bias_ih", (rows,)), ("bias_hh", (rows,))]
                for name, shape in shapes:  # torch's order of the state dict
                    self.add_parameter(f"{name}_l{k}{suffix}",
                                       xp.asarray(self.rng.uniform(-bound, bound, shape), dtype=dtype))

    def _suffixes(self) -> list[str]:
        return ["", "_reverse"][:self.directions]

    def _weights(self, k: int, suffix: str):
        """``(W_ih, W_hh, b_ih, b_hh)`` of layer ``k`` (biases ``None`` without ``bias``), and the names."""
        names = [f"{n}_l{k}{suffix}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return [self.params.get(n) for n in names], names

    # -- the two passes of the stack ---------------------------------------------------------------
    def _initial_state(self, state, B: int, dtype) -> list:
        """The initial state as a list of ``STATES`` arrays ``(L*D, B, H)`` (zeros for ``None``), checked."""
        shape = (self.num_layers * self.directions, B, self.hidden_size)
        names = ["h0", "c0"][:self.STATES]
        if state is None:
            return [xp.zeros(shape, dtype=dtype) for _ in names]
        arrays = list(state) if self.STATES > 1 else [state]
        if self.STATES > 1 and (not isinstance(state, (tuple, list)) or len(arrays) != self.STATES):
            raise ShapeError(f"{self!r}: expected the state as a tuple (h0, c0), got {type(state).__name__}")
        for name, array in zip(names, arrays):
            got = tuple(getattr(array, "shape", ()))
            if got != shape:
                raise ShapeError(f"{self!r}: expected {name} of shape (num_layers*directions, B, H) = {shape}, "
                                 f"got {got}")
        return [xp.asarray(a, dtype=dtype) for a in arrays]

    def forward(self, x, state=None):
        r"""Run the stack over the sequence ``x``; returns ``(output, final state)``, as ``torch.nn``'s.

        Args:
            x: ``(T, B, input_size)``, or ``(B, T, input_size)`` with ``batch_first``; or a
                :class:`~mnn.layers.input_projection.TableLookup` of ids of that shape (but
                ``input_size``) into an embedding, which layer 0 folds into its input projection
                (one direction only).
            state: the initial state: ``h0`` (RNN, GRU) or ``(h0, c0)`` (LSTM), each
                ``(num_layers*D, B, H)``; ``None`` for zeros.

        Returns:
            ``output`` ``(T, B, D*H)`` (``(B, T, D*H)`` with ``batch_first``): the last
            layer's ``h`` at every step; the final state ``h_n`` (or ``(h_n, c_n)``),
            each ``(num_layers*D, B, H)``.

        Raises:
            ShapeError: an input that is not 3-D, of the wrong feature size, or a state of the wrong shape.
            ValueError: a ``TableLookup`` given to a bidirectional stack.
        """
        shape = tuple(getattr(x, "shape", ()))
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        if len(shape) != 3 or shape[-1] != self.input_size:
            raise ShapeError(f"{self!r}: expected a 3-D input {layout} with input_size {self.input_size}, "
                             f"got shape {shape}")
        if isinstance(x, TableLookup):  # layer 0 projects the table's rows (mnn.layers.input_projection)
            if self.bidirectional:
                raise ValueError(f"{self!r}: a TableLookup input folds into one direction only; "
                                 "give a bidirectional stack the embedded rows")
            x = x.swap_time_and_batch() if self.batch_first else x  # time-major ids (T, B)
        else:
            x = xp.ascontiguousarray(x.transpose(1, 0, 2) if self.batch_first else x)  # time-major (T, B, in)
        T, B, _ = x.shape
        dtype = x.dtype if xp.issubdtype(x.dtype, xp.floating) else default_dtype()
        state0 = self._initial_state(state, B, dtype)
        final = [xp.empty_like(state0[0]) for _ in range(self.STATES)]
        caches, masks = [], []
        layer_input = x
        for k in range(self.num_layers):
            if k > 0 and self.training and self.dropout > 0:  # dropout between layers (inverted: scaled in training)
                keep = 1.0 - self.dropout
                mask = xp.asarray(self.rng.random(layer_input.shape) < keep, dtype=dtype) / xp.asarray(keep, dtype)
                layer_input = layer_input * mask
                masks.append(mask)
            else:
                masks.append(None)
            output = xp.empty((T, B, self.directions * self.hidden_size), dtype=dtype)
            for d, suffix in enumerate(self._suffixes()):
                index = k * self.directions + d
                weights, _ = self._weights(k, suffix)
                inp = layer_input if d == 0 else layer_input[::-1]  # the reversed direction reads time backwards
                out, stateT, cache = self._forward_direction(inp, [s[index] for s in state0], *weights)
                output[:, :, d * self.hidden_size:(d + 1) * self.hidden_size] = out if d == 0 else out[::-1]
                for f, s in zip(final, stateT):
                    f[index] = s
                caches.append(cache)
            layer_input = output
        self.cache = (caches, masks, x.shape, dtype)
        out = layer_input.transpose(1, 0, 2) if self.batch_first else layer_input
        return out, (final[0] if self.STATES == 1 else tuple(final))

    def backward(self, doutput, dstate=None):
        r"""Backpropagate through time, layer by layer from the top; returns ``(dx, dstate0)``.

        Args:
            doutput: $\partial L / \partial\,\mathrm{output}$, the output's shape; ``None`` for zeros.
            dstate: $\partial L / \partial$ of the final state: ``dh_n`` (RNN, GRU) or
                ``(dh_n, dc_n)`` (LSTM, either may be ``None``), each ``(num_layers*D, B, H)``;
                ``None`` when the final state was not used (zeros).

        Returns:
            ``dx`` of the input's shape (``None`` for a ``TableLookup`` input, whose gradient went
            into the embedding's), and the gradient reaching the initial state,
            ``dh0`` or ``(dh0, dc0)`` shaped ``(num_layers*D, B, H)``. It is returned also
            when ``forward`` was given ``state=None``: it is then the gradient of those zeros
            (drop it).
        """
        caches, masks, (T, B, _), dtype = self.pop_cache()
        H, D = self.hidden_size, self.directions
        out_shape = (B, T, D * H) if self.batch_first else (T, B, D * H)
        if doutput is None:
            doutput = xp.zeros(out_shape, dtype=dtype)
        check_output_grad(self, doutput, out_shape)
        dstateT = self._final_state_grad(dstate, B, dtype)
        dstate0 = [xp.empty_like(s) for s in dstateT]
        dlayer = doutput.transpose(1, 0, 2) if self.batch_first else doutput  # time-major (T, B, D*H)
        for k in reversed(range(self.num_layers)):
            dinput = None
            for d, suffix in enumerate(self._suffixes()):
                index = k * D + d
                weights, names = self._weights(k, suffix)
                dout = dlayer[:, :, d * H:(d + 1) * H]
                dout = xp.ascontiguousarray(dout if d == 0 else dout[::-1])
                dx, ds0 = self._backward_direction(dout, [s[index] for s in dstateT], caches[index],
                                                   weights, [self.grads.get(n) for n in names])
                dx = dx if d == 0 else dx[::-1]  # None from a TableLookup (one direction)
                dinput = dx if dinput is None else dinput + dx  # both directions read the same input
                for out, s in zip(dstate0, ds0):
                    out[index] = s
            if masks[k] is not None:
                dinput = dinput * masks[k]
            dlayer = dinput
        dx = dlayer.transpose(1, 0, 2) if self.batch_first and dlayer is not None else dlayer
        return dx, (dstate0[0] if self.STATES == 1 else tuple(dstate0))

    def _final_state_grad(self, dstate, B: int, dtype) -> list:
        """``dstate`` as a list of ``STATES`` arrays ``(L*D, B, H)``; ``None`` (whole or one part) means zeros."""
        shape = (self.num_layers * self.directions, B, self.hidden_size)
        parts = [None] * self.STATES if dstate is None else (list(dstate) if self.STATES > 1 else [dstate])
        if len(parts) != self.STATES:
            raise ShapeError(f"{self!r}: expected dstate as a tuple (dh_n, dc_n), got {len(parts)} arrays")
        result = []
        for name, part in zip(["dh_n", "dc_n"], parts):
            if part is None:
                result.append(xp.zeros(shape, dtype=dtype))
                continue
            if tuple(getattr(part, "shape", ())) != shape:
                raise ShapeError(f"{self!r}: backward expected {name} of the final state's shape {shape}, "
                                 f"got {tuple(getattr(part, 'shape', ()))}")
            result.append(part)
        return result

    def flops(self, x_shape, *state_shapes) -> tuple[int, int]:
        """``(2TBGH(n + H), 4TBGH(n + H))`` summed over layers and directions (see the class docstring)."""
        T, B = x_shape[:2] if not self.batch_first else x_shape[1::-1]
        rows, forward = self.GATES * self.hidden_size, 0
        for k in range(self.num_layers):
            fan_in = self.input_size if k == 0 else self.directions * self.hidden_size
            forward += self.directions * 2 * T * B * rows * (fan_in + self.hidden_size)  # input + recurrent
        return forward, 2 * forward  # carry, dW_hh: 2TBGH^2 each; dW_ih, dX: 2TBGHn each

    # -- one direction of one layer: what a cell supplies ------------------------------------------
    def _forward_direction(self, x, state0, w_ih, w_hh, b_ih, b_hh):
        """``x (T, B, in)`` and ``state0`` (list of ``(B, H)``) to ``(output (T, B, H), final state list, cache)``."""
        raise NotImplementedError

    def _backward_direction(self, doutput, dstateT, cache, weights, grads):
        """``doutput (T, B, H)``, ``dstateT`` (list of ``(B, H)``) to ``(dx (T, B, in), dstate0 list)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text


# OpenBLAS's SkylakeX kernel multiplies small matrices (M N K <= 1e6) without packing the operands;
# a larger product packs its whole weight operand on every call. The per-step products of the time
# loops are (B, H) x (H, G*H) with a small B: split into column blocks under that size, they ran
# 2-2.5x faster at B 6 (H 256, one BLAS thread, measured 2026-12; the LSTM LM's replica slice).
SMALL_PRODUCT = 1_000_000


class StepProduct:
    r"""``out = x @ w`` for the time loop's ``x (B, K)``, ``w (K, N)``: in column blocks of ``w``, copied once.

    Each block is ``w[:, j0:j1]`` made contiguous, ``j1 - j0`` the largest power of two with
    ``B K (j1 - j0) <= SMALL_PRODUCT`` (at least 16; one block when the whole product is that
    small). The blocks write into ``out[:, j0:j1]``: the same numbers as one product, column by column.
    """

    def __init__(self, w, batch: int) -> None:
        K, N = w.shape
        width = N
        if batch * K * N > SMALL_PRODUCT:
            width = max(16, 1 << int(math.log2(max(1, SMALL_PRODUCT // (batch * K)))))
        if width >= N:
            self.blocks = [(0, N, xp.ascontiguousarray(w))]
        else:
            self.blocks = [(j, min(N, j + width), xp.ascontiguousarray(w[:, j:j + width])) for j in range(0, N, width)]

    def __call__(self, x, out):
        if len(self.blocks) == 1:
            return xp.matmul(x, self.blocks[0][2], out=out)
        for j0, j1, block in self.blocks:
            xp.matmul(x, block, out=out[:, j0:j1])
        return out

