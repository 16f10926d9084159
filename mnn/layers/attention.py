r"""Multi-head (causal) self-attention: scores, mask, softmax over keys, and the backward through all of it.

Shapes follow llm.c: ``B`` batch, ``T`` time (tokens), ``C`` channels,
``NH`` heads, ``hs = C / NH`` head size.
"""

from __future__ import annotations

import math

import numpy

from mnn import blas, precision
from mnn.backend import default_dtype, xp
from mnn.layers.dropout import Dropout
from mnn.layers.linear import Linear
from mnn.layers.matmul import MatrixProduct
from mnn.layers.softmax import Softmax
from mnn.module import Module, check_input, check_output_grad, no_grad


CAUSAL_BLOCK = 64  # query rows per block of the causal products (Eqs. 7-10)


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

    Causal blocks. Cut the $T$ positions into blocks $I_1, I_2, \dots$ of
    $b$ consecutive rows (``causal_block``, 64), and write $J_r = \{1, \dots,
    \max I_r\}$ for the keys up to the end of block $r$. Query $i \in I_r$
    sees no key $j > \max I_r$, so every score block right of $J_r$ is
    $-\infty$ after the mask and every weight there is exactly 0. With
    causal masking and $T > b$ the products skip those blocks. Forward, for
    each block $r$:

    $$
    S_{I_r, J_r} = (sQ)_{I_r}\, K_{J_r}^\top, \qquad S_{I_r, j} = 0 \ \ (j > \max I_r,\ \text{masked in (2)}), \tag{7}
    $$

    $$
    Y_{I_r} = A_{I_r, J_r}\, V_{J_r} \quad (A_{ij} = 0 \text{ for the other } j). \tag{8}
    $$

    Backward: (4) and (6) restricted to the same blocks. $\bar P$ is needed
    only where $P \neq 0$, since (5) multiplies it by $P$; the key side sums
    over the rows that can see block $c$, the rows $i \ge \min I_c$:

    $$
    \bar P_{I_r, J_r} = G_{I_r} V_{J_r}^\top, \quad \bar P_{I_r, j} = 0 \ (j > \max I_r), \qquad
    \frac{\partial L}{\partial V_{I_c}} = A_{i \ge \min I_c,\, I_c}^\top\, G_{i \ge \min I_c}, \tag{9}
    $$

    $$
    \frac{\partial L}{\partial Q_{I_r}} = s\, \bar S_{I_r, J_r} K_{J_r}, \qquad
    \frac{\partial L}{\partial K_{I_c}} = \bar S_{i \ge \min I_c,\, I_c}^\top\, (sQ)_{i \ge \min I_c}. \tag{10}
    $$

    The terms left out are products with zeros, so (7)-(10) give the
    gradients of (4)-(6). With $m = T / b$ blocks the products do
    $(m + 1) / 2m$ of the full work: 5/8 at $T = 256$. Measured on 2 cores of
    an Intel Xeon (2026-12-01, MKL 2026.0 on one thread, alternating runs): one
    replica of nanoGPT's GPU config at B 4 stepped in 500 ms with the full
    products and 487 ms with the blocks.

    Row blocks. The softmax (3) and its gradient (5) work row by row, so they
    too can run on one block of rows $I_r$ at a time, over its keys $J_r$
    only: the scores of block $r$ go through (7), (2)-(3) and (8) while they
    are in cache, and only the blocks' $A_{I_r, J_r}$ are kept (no $T \times T$
    array, nothing to zero right of the diagonal blocks). Backward then takes
    the row blocks one at a time too: (9)'s $\bar P_{I_r, J_r}$, (5) on it, and
    (10)'s $\partial L / \partial Q_{I_r}$; the key side, a sum over rows, is
    added block by block,

    $$
    \frac{\partial L}{\partial V_{J_r}} \mathrel{+}= A_{I_r, J_r}^\top\, G_{I_r}, \qquad
    \frac{\partial L}{\partial K_{J_r}} \mathrel{+}= \bar S_{I_r, J_r}^\top\, (sQ)_{I_r}, \tag{11}
    $$

    the same sums as (9)-(10) in another order, from the last block, which
    sees every key and writes both gradients whole. This is how the blocks
    run when the attention weights are not dropped (dropout 0, or
    evaluation); with dropout on them, one ``(B, NH, T, T)`` array of weights
    is kept for the dropout's mask, as above.

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

    FLOPs (matrix products, counted by the sub-layers): ``c_attn`` $6BTC^2$ and
    ``c_proj`` $2BTC^2$ forward (:class:`~mnn.layers.Linear`); the full
    $T \times T$ products $QK^\top$ of (2) and $AV$ of (3), $2BT^2C$ each
    forward (all $NH$ heads; the model's count, as FLOP counters count it,
    though the causal blocks (7)-(10) leave out about half of them for
    $T > b$); backward twice the forward: (4) and (6) are $4BT^2C$ each.
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
        self.causal_block = CAUSAL_BLOCK

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

    def blocks(self, T: int) -> list | None:
        """The row blocks ``[(r0, r1), ...]`` of Eqs. (7)-(10) for ``T`` positions, or ``None`` for the full products
        (full attention, one block only, or bf16/fp16, whose rounded products are :class:`MatrixProduct`'s)."""
        if not self.causal or T <= self.causal_block or precision.active():
            return None
        return [(r0, min(r0 + self.causal_block, T)) for r0 in range(0, T, self.causal_block)]

    def forward(self, x):
        check_input(self, x, last_dim=self.n_embd, ndim=3)
        B, T, C = x.shape
        qkv = self.c_attn.forward(x.reshape(B * T, C))  # Eq. (1)
        blocks = self.blocks(T)
        split = self.split_heads(qkv, B, T)
        if blocks is None:
            q, k, v = split
            q *= self.scale  # Eq. (2): s Q, in place in c_attn's fresh output (c_attn keeps its input, not this)
        else:  # the heads as one contiguous stack (each block one batched product), s applied as Q is copied
            q, k, v = stack = xp.empty(split.shape, dtype=qkv.dtype)
            xp.multiply(split[0], self.scale, out=q)  # Eq. (2): s Q
            stack[1:] = split[1:]
        y = xp.empty((B, T, C), dtype=q.dtype)  # the heads side by side: Y_all
        if blocks is not None and not self.attn_dropout.active:
            heads, kept = self._forward_row_blocks(q, k, v, blocks)  # Eqs. (7), (3), (8)
            self.merge_view(y)[...] = heads
            self.cache = (B, T, (blocks, q, k, v, kept))  # kept: a list, the row blocks' weights
            out = self.resid_dropout.forward(self.c_proj.forward(y.reshape(B * T, C)))
            return out.reshape(B, T, C)
        if blocks is None:
            scores = self.scores.forward(q, xp.swapaxes(k, -1, -2))  # Eq. (2): S = (sQ) K^T
        else:  # heads as one contiguous stack, so that each block is one batched product
            scores = xp.empty((B, self.n_head, T, T), dtype=q.dtype)
            for r0, r1 in blocks:
                blas.matmul(q[..., r0:r1, :], xp.swapaxes(k[..., :r1, :], -1, -2), out=scores[..., r0:r1, :r1])  # (7)
                scores[..., r0:r1, r1:] = 0  # Eq. (7): masked below, so any finite number
        mask = self.causal_mask(T, dtype=scores.dtype) if self.causal else None  # Eq. (2): -inf above the diagonal
        probs = self.softmax.forward(scores, mask, self.own_scores(scores), out=scores)  # Eq. (3), in place
        probs = self.attn_dropout.forward(probs)  # Eq. (3)
        if blocks is None:
            self.weighted_sum.forward(probs, v, out=self.merge_view(y))  # Eq. (3): Y = A V, written merged
            self.cache = (B, T, None)
        else:
            heads = xp.empty_like(v)
            for r0, r1 in blocks:
                blas.matmul(probs[..., r0:r1, :r1], v[..., :r1, :], out=heads[..., r0:r1, :])  # Eq. (8)
            self.merge_view(y)[...] = heads
            self.cache = (B, T, (blocks, q, k, v, probs))
        out = self.resid_dropout.forward(self.c_proj.forward(y.reshape(B * T, C)))
        return out.reshape(B, T, C)

    def backward(self, dy):
        B, T, blocked = self.pop_cache()
        C, NH, hs = self.n_embd, self.n_head, self.head_size
        check_output_grad(self, dy, (B, T, C))
        dy = self.c_proj.backward(self.resid_dropout.backward(dy.reshape(B * T, C)))
        dy = self.merge_view(dy.reshape(B, T, C))  # un-merge heads: a strided view
        if blocked is not None and isinstance(blocked[-1], list):  # the row blocks' weights (forward)
            return self._backward_row_blocks(dy, *blocked)
        if blocked is not None:
            return self._backward_blocks(dy, *blocked)
        dprobs, dv = self.weighted_sum.backward(dy)  # Eq. (4)
        dscores = self.softmax.backward(self.attn_dropout.backward(dprobs))  # Eq. (5)
        dq_scaled, dk_transposed = self.scores.backward(dscores)  # Eq. (6) before the factor s
        dqkv = xp.empty((B, T, 3, NH, hs), dtype=dy.dtype)
        dq, dk, dv_slot = self.split_heads(dqkv, B, T)
        xp.multiply(dq_scaled, self.scale, out=dq)  # Eq. (6): dQ = s (dS K)
        dk[...] = xp.swapaxes(dk_transposed, -1, -2)  # Eq. (6): dK = s dS^T Q (s is inside sQ)
        dv_slot[...] = dv  # Eq. (4)
        return self.c_attn.backward(dqkv.reshape(B * T, 3 * C)).reshape(B, T, C)

    def _backward_blocks(self, g, blocks, q, k, v, probs):
        """Eqs. (9)-(10), then (5), for the blocked forward: every product over the blocks on or below the diagonal."""
        B, NH, T, hs = q.shape
        g = xp.ascontiguousarray(g)  # heads as one contiguous stack (see forward)
        dprobs = xp.empty((B, NH, T, T), dtype=g.dtype)
        dq, dk, dv = dheads = xp.empty((3, B, NH, T, hs), dtype=g.dtype)
        for r0, r1 in blocks:
            blas.matmul(g[..., r0:r1, :], xp.swapaxes(v[..., :r1, :], -1, -2), out=dprobs[..., r0:r1, :r1])  # (9)
            dprobs[..., r0:r1, r1:] = 0  # Eq. (9): multiplied by P = 0 in (5); zero, so that no garbage is a NaN
            blas.matmul(xp.swapaxes(probs[..., r0:, r0:r1], -1, -2), g[..., r0:, :], out=dv[..., r0:r1, :])  # (9)
        dscores = self.softmax.backward(self.attn_dropout.backward(dprobs))  # Eq. (5)
        for r0, r1 in blocks:
            blas.matmul(dscores[..., r0:r1, :r1], k[..., :r1, :], out=dq[..., r0:r1, :])  # Eq. (10): S-bar K
            blas.matmul(xp.swapaxes(dscores[..., r0:, r0:r1], -1, -2), q[..., r0:, :], out=dk[..., r0:r1, :])  # (10)
        return self._heads_backward(dheads, B, T)

    def _heads_backward(self, dheads, B: int, T: int):
        """``(dQ, dK, dV)``, each ``(B, NH, T, hs)``, with $s$ not yet applied to dQ: through ``c_attn``."""
        dqkv = xp.empty((B * T, 3 * self.n_embd), dtype=dheads.dtype)
        slots = self.split_heads(dqkv, B, T)  # the heads side by side again, for c_attn
        xp.multiply(dheads[0], self.scale, out=slots[0])  # Eq. (10): dQ = s (S-bar K), scaled as it is laid out
        slots[1:] = dheads[1:]  # dK = S-bar^T (sQ) has its s already
        return self.c_attn.backward(dqkv).reshape(B, T, self.n_embd)

    def _forward_row_blocks(self, q, k, v, blocks):
        """Eqs. (7), (3) and (8) row block by row block, each block's softmax while its scores are in cache:
        ``(heads, the blocks' probabilities)``, each ``(B, NH, |I_r|, max I_r)``, none right of its diagonal."""
        mask = self.causal_mask(q.shape[2], dtype=q.dtype)
        heads, kept = xp.empty_like(v), []
        for r0, r1 in blocks:
            scores = blas.matmul(q[..., r0:r1, :], xp.swapaxes(k[..., :r1, :], -1, -2))  # Eq. (7)
            probs = self.softmax.probabilities(scores, xp.ascontiguousarray(mask[r0:r1, :r1]),  # Eqs. (2)-(3)
                                               self.own_scores(scores), out=scores)
            blas.matmul(probs, v[..., :r1, :], out=heads[..., r0:r1, :])  # Eq. (8)
            kept.append(probs)
        return heads, kept

    def _backward_row_blocks(self, g, blocks, q, k, v, kept):
        """Eqs. (9), (5), (10) for each row block, over its kept probabilities; dK and dV add up over the blocks
        as Eq. (11), starting from the last, which sees every key and so writes them whole."""
        g = xp.ascontiguousarray(g)
        dheads = xp.empty((3,) + q.shape, dtype=g.dtype)
        dq, dk, dv = dheads
        for index in reversed(range(len(blocks))):
            (r0, r1), probs = blocks[index], kept[index]
            g_rows, q_rows = g[..., r0:r1, :], q[..., r0:r1, :]
            dprobs = blas.matmul(g_rows, xp.swapaxes(v[..., :r1, :], -1, -2))  # Eq. (9): P-bar, this block's
            dscores = self.softmax.input_grad(probs, dprobs)  # Eq. (5)
            blas.matmul(dscores, k[..., :r1, :], out=dq[..., r0:r1, :])  # Eq. (10): S-bar K
            if r1 == q.shape[2]:  # the last block: every key's first term of Eq. (11)
                blas.matmul(xp.swapaxes(dscores, -1, -2), q_rows, out=dk)  # Eq. (11)
                blas.matmul(xp.swapaxes(probs, -1, -2), g_rows, out=dv)  # Eq. (11)
            else:
                blas.add_matmul(dk[..., :r1, :], xp.swapaxes(dscores, -1, -2), q_rows)  # Eq. (11)
                blas.add_matmul(dv[..., :r1, :], xp.swapaxes(probs, -1, -2), g_rows)  # Eq. (11)
        return self._heads_backward(dheads, q.shape[0], q.shape[2])

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
