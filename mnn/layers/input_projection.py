r"""A recurrent layer's input terms for all time steps at once, and the weights' gradients after its loop.

Read :mod:`mnn.layers.rnn` first. Every cell's step starts with the input
projection $x_t W_{ih}^\top + b$, which does not depend on the state, so the
$T$ steps' projections are one matrix product before the time loop
(:func:`project_inputs`), and the gradients of the weights, summed over the
steps, are one product each after it (:func:`accumulate_weight_grads`).

Folding an embedding into the projection (:class:`TableLookup`). The first
layer of a language model reads the rows of an embedding table
$E \in \mathbb{R}^{V \times n}$ picked by the ids $i_1, \dots, i_N$ of its
$N = T B$ positions: $X = S E$, with the one-hot
$S \in \{0, 1\}^{N \times V}$, $S_{nv} = [i_n = v]$ (Eq. 1 of
:class:`~mnn.layers.Embedding`). Every row of $S$ holds one 1
($S \mathbf{1}_V = \mathbf{1}_N$), so the projection of $W \in \mathbb{R}^{GH \times n}$ is

$$
A = X W^\top + \mathbf{1}_N b^\top = S \big(E W^\top + \mathbf{1}_V b^\top\big) = S P, \qquad
P = E W^\top + \mathbf{1}_V b^\top \in \mathbb{R}^{V \times GH} \tag{1}
$$

$$
A_{n,:} = P_{i_n,:} \tag{2}
$$

a product of the $V$ rows of the table, then a gather of $N$ of its rows:
$2VnGH$ FLOPs instead of $2NnGH$ (65 characters against $N = 2048$
positions at batch 32, $T = 64$).

Backward. With $G = \partial L / \partial A$ ``(N, GH)`` (what the time loop
leaves for the input terms), the element partials of (2) are
$\partial A_{n,k} / \partial P_{v,l} = [i_n = v]\, \delta_{kl}$, and the
vector-Jacobian product sums the gradient rows of the positions that read
each row of $P$ (a scatter-add, as Embedding's Eq. 2):

$$
\frac{\partial L}{\partial P_{v,:}} = \sum_{n \,:\, i_n = v} G_{n,:}, \qquad
\text{i.e.}\quad \frac{\partial L}{\partial P} = S^\top G \in \mathbb{R}^{V \times GH} \tag{3}
$$

Then (1) is a linear layer over the $V$ rows of $E$ (Linear's Eqs. 2-4):

$$
\frac{\partial L}{\partial W} \mathrel{+}= \Big(\frac{\partial L}{\partial P}\Big)^{\!\top} E \tag{4}
$$

$$
\frac{\partial L}{\partial E} \mathrel{+}= \frac{\partial L}{\partial P}\, W \tag{5}
$$

$$
\frac{\partial L}{\partial b} \mathrel{+}= \mathbf{1}_V^\top \frac{\partial L}{\partial P}
\;\big(= \mathbf{1}_V^\top S^\top G = \mathbf{1}_N^\top G\big) \tag{6}
$$

These are the unfolded gradients: $G^\top X = G^\top S E = (S^\top G)^\top E$
is (4), and the embedding's scatter of $\partial L / \partial X = G W$ is
$S^\top G W$, which is (5). The two $N$-row products $G^\top X$ and $G W$
($2NnGH$ FLOPs each) become $V$-row ones, for one pass of additions over $G$
(3); the embedding's own gather and scatter of $N$ rows disappear. It pays
when $V < N$ and (3) is one compiled pass (:meth:`TableLookup.sum_rows`);
:class:`~mnn.models.CharRNN` folds then, and the numbers equal the unfolded
path's to rounding (the sums run in another order). The LSTM's compiled
backward loop computes (3) itself, while each step's rows are in cache
(:func:`~mnn.layers.lstm_compiled.backward_loop`).
"""

from __future__ import annotations

import copy

from mnn import jit
from mnn.backend import xp
from mnn.layers.embedding import sum_rows_by_id


class TableLookup:
    r"""A recurrent stack's input given as ids into an embedding's table: the rows $E_{i_n}$, never formed.

    Give it to :meth:`~mnn.layers.rnn.RecurrentBase.forward` in place of the
    embedded input: layer 0 computes its input terms by Eqs. (1)-(2) of
    :mod:`mnn.layers.input_projection` (derived there) and, in backward, its
    part of the gradients by Eqs. (3)-(6), adding Eq. (5) into
    the embedding's gradient itself (the stack's backward then returns
    ``None`` for its input). One direction only (not ``bidirectional``).

    Args:
        ids: integer ids ``(B, T)`` (batch first) or ``(T, B)``, as the stack's input; refused as
            :meth:`~mnn.layers.Embedding.check_ids` refuses them.
        embedding: the :class:`~mnn.layers.Embedding` holding $E$ ``(V, n)`` and its gradient.

    Attributes:
        shape: the shape of the rows it stands for, ``ids.shape + (n,)``; ``dtype`` is $E$'s.
        nbytes: 0, no array of that shape is made (for :mod:`mnn.summary`'s accounting).
    """

    def __init__(self, ids, embedding) -> None:
        embedding.check_ids(ids)
        self.ids, self.embedding = ids, embedding
        self.table = embedding.params["weight"]
        self.shape = tuple(ids.shape) + (self.table.shape[1],)
        self.dtype, self.nbytes = self.table.dtype, 0

    @property
    def rows(self) -> int:
        """$V$, the rows of the table."""
        return self.table.shape[0]

    def swap_time_and_batch(self) -> TableLookup:
        """The same lookup with the ids' two axes swapped (batch first to time-major), contiguous."""
        swapped = copy.copy(self)
        swapped.ids = xp.ascontiguousarray(self.ids.T)
        swapped.shape = (self.shape[1], self.shape[0], self.shape[2])
        return swapped

    def project(self, w_ih, bias):
        """Eqs. (1)-(2): ``(T, B, G*H)``, the input terms of every position, from ``w_ih (G*H, n)``, ``bias``."""
        table_projected = self.table @ w_ih.T  # Eq. (1): P, (V, G*H)
        if bias is not None:
            table_projected += bias  # Eq. (1)
        return xp.take(table_projected, self.ids, axis=0)  # Eq. (2)

    def sum_rows(self, dpre):
        """Eq. (3): ``dpre`` (``(T, B, G*H)`` or ``(T*B, G*H)``) summed into one row per id, ``(V, G*H)``.

        Compiled (:mod:`mnn.jit`), one pass adding each row into its id's; else
        :func:`~mnn.layers.embedding.sum_rows_by_id`'s sorted segments, which
        sort and copy the wide rows: at $4H = 1024$ columns on the CPU they took
        longer than the two products the fold saves, the compiled pass 0.3 ms
        where the products took about 10 (2048 rows, one thread, 2026-12).
        """
        ids, rows = self.ids.reshape(-1), dpre.reshape(self.ids.size, -1)
        dtable_projected = xp.zeros((self.rows, rows.shape[1]), dtype=rows.dtype)  # rows no position read stay 0
        if jit.usable(ids, rows):
            _sum_rows_kernel(ids, rows, dtable_projected)  # Eq. (3)
        else:
            unique, sums = sum_rows_by_id(ids, rows)
            dtable_projected[unique] = sums  # Eq. (3)
        return dtable_projected

    def backward(self, dtable_projected, w_ih, dw_ih) -> None:
        r"""Eqs. (4)-(5) from $\partial L / \partial P$ ``(V, G*H)``, into ``dw_ih`` and the embedding's gradient."""
        dw_ih += dtable_projected.T @ self.table  # Eq. (4)
        self.embedding.grads["weight"] += dtable_projected @ w_ih  # Eq. (5)


def project_inputs(x, w_ih, bias):
    r"""All time steps' input projections as one matrix product: ``(T, B, in) -> (T, B, G*H)``.

    $X W_{ih}^\top + b$ for the $T B$ rows at once (one GEMM instead of $T$);
    ``bias`` is ``None`` or a ``(G*H,)`` vector. For a :class:`TableLookup`,
    the table's rows are projected and gathered instead (Eqs. 1-2).
    """
    if isinstance(x, TableLookup):
        return x.project(w_ih, bias)  # Eqs. (1)-(2)
    T, B, n = x.shape
    projected = (x.reshape(T * B, n) @ w_ih.T).reshape(T, B, -1)
    if bias is not None:
        projected += bias
    return projected


def accumulate_weight_grads(dpre_x, x, dpre_h, h_prev, weights, grads):
    r"""The gradients summed over time, each one matrix product after the loop, and ``dx``.

    ``dpre_x (T, B, G*H)``: $\partial L$ w.r.t. the input projections $x_t W_{ih}^\top + b_{ih}$;
    ``dpre_h (T, B, G*H)``: w.r.t. the recurrent ones $h_{t-1} W_{hh}^\top + b_{hh}$ (the same
    array for RNN and LSTM); ``h_prev (T, B, H)`` holds $h_0 \dots h_{T-1}$. As Linear's Eqs. (2)-(4)
    with the $T B$ rows stacked:
    $\partial L/\partial W_{ih} \mathrel{+}= \sum_t G_t^{x\top} x_t$,
    $\partial L/\partial W_{hh} \mathrel{+}= \sum_t G_t^{h\top} h_{t-1}$, the biases the column sums,
    $\partial L/\partial X = G^x W_{ih}$. For a :class:`TableLookup` ``x``, $G^x$ is first
    summed per id (Eq. 3), then Eqs. (4)-(6); ``dx`` is ``None`` (it went into the table's gradient).
    """
    (w_ih, _, b_ih, _), (dw_ih, dw_hh, db_ih, db_hh) = weights, grads
    T, B, n = x.shape
    rows = w_ih.shape[0]
    gx, gh = dpre_x.reshape(T * B, rows), dpre_h.reshape(T * B, rows)
    dw_hh += gh.T @ h_prev.reshape(T * B, -1)
    if isinstance(x, TableLookup):
        summed = x.sum_rows(gx)  # Eq. (3): (V, G*H)
        x.backward(summed, w_ih, dw_ih)  # Eqs. (4), (5)
        dx = None
    else:
        summed = gx
        dw_ih += gx.T @ x.reshape(T * B, n)
        dx = (gx @ w_ih).reshape(T, B, n)
    if b_ih is not None:
        db = xp.ones(summed.shape[0], dtype=gx.dtype) @ summed  # 1^T G (Eq. 6 when folded): see Linear
        db_ih += db
        db_hh += db if gh is gx else xp.ones(T * B, dtype=gh.dtype) @ gh
    return dx


@jit.kernel
def _sum_rows_kernel(ids, rows, out):
    """Eq. (3): ``out[ids[n]] += rows[n]`` for every row ``n``, in order."""
    N, G = rows.shape
    for n in range(N):
        row, total = rows[n], out[ids[n]]
        for j in range(G):
            total[j] += row[j]  # Eq. (3)
